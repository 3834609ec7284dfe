"""The one way a TensorRT engine is made from an export, for ``build-engine`` and ``validate --backend tensorrt``.

:class:`EngineLoader` imports TensorRT, registers the plugin libraries before any parse (the ONNX parser
looks custom nodes up in the registry), parses the ONNX file into a strongly typed network (every
tensor's precision from the ONNX types; TensorRT 11 knows no other kind, 10 is asked for it), counts
the plugin layers the parser made, gives the network one optimisation profile computed from the
manifest (:class:`Profile` -> :func:`profile_shapes`) and builds the serialized engine. ``build-engine``
asks for batch 1..max and T 1..max-seq and writes the bytes with a sidecar; ``validate`` asks for batch 1
and T 1..chunk and hands the bytes to Polygraphy's ``TrtRunner``.

Plugin-mode exports (``--wkv plugin``) need TensorRT >= 10.7: each ``rwkv::WKV*`` node is also a
model-local ONNX function, and the ONNX parser of 10.0-10.6 prefers the function over a registered
plugin (10.7 reversed that; 10.15+/11 take the plugin first when the node names a plugin_namespace).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from rwkv_runtime.tensorrt.loader import (
    RWKV_PLUGIN_LIBRARY,
    TensorRTError,
    import_tensorrt,
    load_plugin_library,
    trt_logger,
)

from ...errors import ExportError

STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
# The first TensorRT whose ONNX parser prefers a registered plugin over a model-local function of the
# same op type (CHANGELOG 10.7: "prioritizes using plugins over local functions").
MIN_PLUGIN_TRT = (10, 7)


class EngineBuildError(ExportError):
    """TensorRT could not parse or build the model, or the build options are inconsistent."""


@dataclass(frozen=True)
class Profile:
    """The ranges of one optimisation profile: batch ``1..max_batch`` (tuned for ``opt_batch``) for the
    tokens and every state input; for a sequence graph also T ``1..max_seq`` (tuned for ``opt_seq``,
    None: ``min(128, max_seq)``)."""

    max_batch: int = 8
    opt_batch: int = 1
    max_seq: int = 256
    opt_seq: int | None = None

    @classmethod
    def for_validation(cls, chunk: int) -> Profile:
        """validate's: batch 1, a sequence graph fed 1..chunk tokens per call (tuned for chunk)."""
        return cls(max_batch=1, opt_batch=1, max_seq=chunk, opt_seq=chunk)


def profile_shapes(manifest, name: str, shape: tuple | None, profile: Profile, where: str = "the model") -> list:
    """[min, opt, max] shapes of network input ``name``, from the manifest; when ``shape`` (the parsed
    network's, -1 for a dynamic axis) is given, checked against it."""
    opt_seq = profile.opt_seq or min(128, profile.max_seq)
    batches = (1, profile.opt_batch, profile.max_batch)
    if name == manifest.tokens_input:
        if manifest.graph == "sequence":
            want = [(b, t) for b, t in zip(batches, (1, opt_seq, profile.max_seq))]
        else:
            want = [(b,) for b in batches]
    else:
        spec = next((s for s in manifest.state if s.name == name), None)
        if spec is None:
            raise EngineBuildError(f"{where}: input {name!r} is neither the tokens nor a state tensor of the manifest")
        want = [tuple(spec.concrete_shape(b)) for b in batches]
    if shape is not None and (
        len(shape) != len(want[0]) or any(d >= 0 and any(w[axis] != d for w in want) for axis, d in enumerate(shape))
    ):
        raise EngineBuildError(
            f"{where}: input {name} has shape {list(shape)} in the graph but the manifest "
            f"implies {list(want[2])} at batch {profile.max_batch} (the batch and T axes must be "
            "dynamic; re-export the model)"
        )
    return [tuple(w) for w in want]


def custom_ops(model) -> list:
    """(op_type, plugin_version, plugin_namespace) of every non-standard node of an ONNX file, sorted
    (the nodes only: the weights are not loaded)."""
    import onnx

    try:
        m = onnx.load(str(model), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
        raise EngineBuildError(f"{Path(model).name}: not an ONNX model ({type(e).__name__})") from None
    ops = set()
    for n in m.graph.node:
        if n.domain in STANDARD_DOMAINS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        dec = {
            k: v.decode() if isinstance(v, bytes) else str(v)
            for k, v in attrs.items()
            if k in ("plugin_version", "plugin_namespace")
        }
        ops.add((n.op_type, dec.get("plugin_version", "1"), dec.get("plugin_namespace", n.domain)))
    return sorted(ops)


def register_plugins(trt, paths, echo=None, dlopen: bool = False) -> None:
    """Register plugin libraries into the TensorRT already imported: ``librwkv_trt_plugins.so`` (and,
    unless ``dlopen``, every library) through ``IPluginRegistry.load_library``; with ``dlopen`` any other
    library (the autoregister one, a foreign one) with a plain dlopen, which registers it now that
    TensorRT is loaded. build-engine records its libraries for the runtime's ``load_library``, so it
    keeps ``dlopen`` off (an autoregister library is then refused in one line)."""
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise TensorRTError(f"plugin library {path} does not exist")
        if path.name == RWKV_PLUGIN_LIBRARY or not dlopen:
            load_plugin_library(trt, path, echo=echo)
        else:
            try:
                ctypes.CDLL(str(path.resolve()))
            except OSError as e:
                raise TensorRTError(f"plugin library {path}: cannot load it ({str(e).splitlines()[0][:160]})") from None


def default_plugin():
    """The built rwkv plugin library (``plugin.find_plugin``), or None."""
    from .plugin import find_plugin

    return find_plugin()


def trt_version(trt) -> tuple:
    parts = []
    for x in str(getattr(trt, "__version__", "0")).split(".")[:2]:
        digits = "".join(ch for ch in x if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (2 - len(parts)))


def network_flags(trt) -> int:
    # TensorRT 11: always strongly typed (the flag is deprecated and ignored); 10: ask for it
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is None or int(str(trt.__version__).split(".")[0]) >= 11:
        return 0
    return 1 << int(flag)


def registered(trt) -> set:
    """(name, version, namespace) of every creator in TensorRT's registry. Read from the creator list,
    not probed with get_creator: a miss there logs "Cannot find plugin" as an error, which then reads
    as the cause of any later, unrelated failure."""
    reg = trt.get_plugin_registry()
    out = set()
    for c in getattr(reg, "all_creators", None) or []:
        name = getattr(c, "name", None)
        if name is not None:
            out.add((str(name), str(getattr(c, "plugin_version", "1")), str(getattr(c, "plugin_namespace", ""))))
    return out


def plugin_layers(trt, network) -> int:
    """How many plugin layers the parsed network contains (IPluginV3 layers; V2 ones too)."""
    lt = getattr(trt, "LayerType", None)
    kinds = {k for k in (getattr(lt, "PLUGIN_V3", None), getattr(lt, "PLUGIN_V2", None)) if k is not None}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


@dataclass
class Built:
    serialized: object  # TensorRT's IHostMemory (bytes-like)
    shapes: dict  # input -> [min, opt, max] as lists
    plugin_layers: int


class EngineLoader:
    """TensorRT imported, one builder, the plugin libraries registered: then :meth:`build` per graph.

    ``plugins``: libraries to register (empty: the built rwkv library when ``needs_plugins`` and it
    exists). ``needs_plugins``: some graph to build has custom nodes. ``dlopen``: see
    :func:`register_plugins`. ``echo`` gets notes and warnings (None: silent)."""

    def __init__(self, plugins=(), needs_plugins: bool = False, echo=None, dlopen: bool = False):
        self.say = echo or (lambda msg: None)
        self.trt = trt = import_tensorrt()  # one line saying what to install, before any work
        self.log = trt_logger(trt)
        self.builder = trt.Builder(self.log)  # first: its logger becomes TensorRT's global one
        self.version = trt_version(trt)
        plugins = [Path(p) for p in plugins]
        if needs_plugins and self.version < MIN_PLUGIN_TRT:
            why = (
                f"TensorRT {trt.__version__}'s ONNX parser builds the rwkv::WKV* nodes from their ONNX function "
                f"bodies even when a plugin is registered (plugins win from TensorRT "
                f"{'.'.join(map(str, MIN_PLUGIN_TRT))} on)"
            )
            if plugins:
                raise EngineBuildError(f"{why}: upgrade TensorRT, or drop --plugin to build the function bodies")
            self.say(f"note: {why}; building the function bodies, no plugin library needed")
        elif not plugins and needs_plugins:
            found = default_plugin()
            if found is not None:
                plugins = [found]
        for p in plugins:
            self.say(f"loading plugin library {p}")
        register_plugins(trt, plugins, echo=self.say, dlopen=dlopen)  # before parsing: the parser asks the registry
        self.plugins = plugins

    def expects_plugin_layers(self, ops: list, name: str) -> bool:
        """True when any custom node has a registered plugin creator (so plugin layers must come out);
        warns for each one that has none (the parser then builds it from its ONNX function body)."""
        if not ops or self.version < MIN_PLUGIN_TRT:
            return False
        have = registered(self.trt)
        missing = [(op, v, ns) for op, v, ns in ops if (op, v, ns) not in have]
        for op, v, ns in missing:
            self.say(
                f"warning: no TensorRT plugin registered for {ns}::{op} (version {v}): TensorRT builds it from "
                "the node's ONNX function body; build plugins/ (see plugins/README.md) or pass --plugin LIB.so"
            )
        return len(missing) < len(ops)

    def parse(self, onnx: Path):
        network = self.builder.create_network(network_flags(self.trt))
        parser = self.trt.OnnxParser(network, self.log)
        # parse_from_file: the parser resolves external data (model.onnx.data) relative to the file
        if not parser.parse_from_file(str(onnx)):
            errs = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
            first = errs[0].splitlines()[0][:300] if errs else self.log.last_error()
            more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
            raise EngineBuildError(f"{onnx.name}: TensorRT's ONNX parser failed: {first}{more}")
        return network, parser

    def build(
        self, onnx, manifest, profile: Profile, expect_plugins: bool = False, tf32: bool = False, configure=None
    ) -> Built:
        """Parse ``onnx`` (strongly typed), check its plugin layers, give it ``profile``, build it.
        ``configure(config)``: the caller's further builder settings (workspace, timing cache, ...)."""
        trt, onnx = self.trt, Path(onnx)
        network, parser = self.parse(onnx)
        n_plugin = plugin_layers(trt, network)
        if expect_plugins and n_plugin == 0:
            raise EngineBuildError(
                f"{onnx.name}: the rwkv plugins are registered but TensorRT {trt.__version__}'s ONNX parser "
                "built the network without any plugin layer (it used the nodes' ONNX function bodies); use "
                f"TensorRT >= {'.'.join(map(str, MIN_PLUGIN_TRT))}, or export with --wkv plain"
            )
        if n_plugin:
            self.say(f"  {n_plugin} plugin layer(s) in the network")
        config = self.builder.create_builder_config()
        tf32_flag = getattr(getattr(trt, "BuilderFlag", None), "TF32", None)
        if tf32_flag is not None and not tf32:
            config.clear_flag(tf32_flag)  # float32 stays float32 (TF32 rounds MatMul inputs to 10 bits)
        if configure is not None:
            configure(config)
        opt = self.builder.create_optimization_profile()
        shapes = {}
        for i in range(network.num_inputs):
            t = network.get_input(i)
            mn, op, mx = profile_shapes(manifest, t.name, tuple(int(d) for d in t.shape), profile, onnx.name)
            opt.set_shape(t.name, mn, op, mx)
            shapes[t.name] = [list(mn), list(op), list(mx)]
        config.add_optimization_profile(opt)
        serialized = self.builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT could not build {onnx.name}: {self.log.last_error()}")
        del parser, network, config
        return Built(serialized, shapes, n_plugin)


__all__ = [
    "EngineLoader",
    "EngineBuildError",
    "Profile",
    "profile_shapes",
    "custom_ops",
    "register_plugins",
    "MIN_PLUGIN_TRT",
]
