"""What an ONNX file says about itself, read straight from its protobuf bytes (no onnx, no onnxruntime).

Two things, in one streaming pass that seeks past every byte it does not need (weights included):

- ``metadata_props`` (ModelProto field 14): the manifest, the tokenizer JSON, a learned initial state;
- every external-data ``location`` the file names: the files onnxruntime (or TensorRT's parser) would
  open when it loads the model. These are paths read from a file, so ``artifact`` confines them to the
  model's folder before anything loads the model.

A tensor can carry external data wherever the ONNX schema has a ``TensorProto``: graph initializers,
sparse initializers, ``Constant``-style node attributes, and the same inside subgraphs (``Scan``/``If``/
``Loop`` bodies), model-local functions and training-info graphs. ``_SCHEMA`` lists exactly those paths
through the messages; everything else is skipped by length.
"""

from __future__ import annotations

import io
from pathlib import Path

from .errors import RuntimeUserError

MAX_META_BYTES = 1 << 30  # one metadata entry (tokenizer JSON, initial state) larger than this is damage
_MAX_ENTRY_BYTES = 1 << 16  # an external_data key/value entry: a file name, an offset, a length
_MAX_DEPTH = 64  # nested subgraphs deeper than this are damage (and would exhaust Python's stack)

# message -> {field number: message it holds}; only the fields that can lead to a TensorProto
_SCHEMA = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 3: "graph"},  # TrainingInfoProto: initialization, algorithm
    "function": {7: "node", 11: "attribute"},  # FunctionProto: node, attribute_proto (defaults)
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto: node, initializer, sparse_initializer
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto: values, indices
}


def _varint(f) -> int | None:
    """A protobuf varint from a file; None at a clean end of file."""
    shift, out = 0, 0
    while True:
        b = f.read(1)
        if not b:
            if shift == 0:
                return None
            raise ValueError("truncated varint")
        out |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return out
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _entry(buf: bytes) -> tuple[str, str]:
    """A StringStringEntryProto: key = field 1, value = field 2 (both length-delimited)."""
    f, key, value = io.BytesIO(buf), "", ""
    while (tag := _varint(f)) is not None:
        num, wire = tag >> 3, tag & 7
        if wire != 2:
            raise ValueError("unexpected wire type in a string entry")
        n = _varint(f)
        data = f.read(n)
        if n is None or len(data) != n:
            raise ValueError("truncated string entry")
        if num == 1:
            key = data.decode("utf-8")
        elif num == 2:
            value = data.decode("utf-8")
    return key, value


class _Reader:
    def __init__(self, f, size: int, want_external: bool):
        self.f, self.size, self.want_external = f, size, want_external
        self.props: dict[str, str] = {}
        self.locations: list[str] = []

    def message(self, kind: str, end: int, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise ValueError("subgraphs nested too deep")
        f = self.f
        children = _SCHEMA.get(kind, {})
        locs = []
        while f.tell() < end:
            tag = _varint(f)
            if tag is None:
                raise ValueError("truncated")
            num, wire = tag >> 3, tag & 7
            if wire == 0:
                if _varint(f) is None:
                    raise ValueError("truncated")
            elif wire == 1:
                f.seek(8, 1)
            elif wire == 5:
                f.seek(4, 1)
            elif wire == 2:
                n = _varint(f)
                if n is None or f.tell() + n > end:
                    raise ValueError("a field runs past its end")
                if kind == "model" and num == 14:  # metadata_props
                    if n > MAX_META_BYTES:
                        raise ValueError("oversized metadata entry")
                    k, v = _entry(f.read(n))
                    self.props[k] = v
                elif kind == "tensor" and num == 13:  # external_data
                    if n > _MAX_ENTRY_BYTES:
                        raise ValueError("oversized external_data entry")
                    k, v = _entry(f.read(n))
                    if k == "location":
                        locs.append(v)
                elif self.want_external and num in children:
                    self.message(children[num], f.tell() + n, depth + 1)
                else:  # weights (raw_data), names, shapes, docs, ...: skipped without reading
                    f.seek(n, 1)
            else:
                raise ValueError(f"wire type {wire}")
            if f.tell() > end:
                raise ValueError("truncated")
        # every location a tensor names, whatever its data_location says: a reader that honours one the
        # file did not flag is still kept inside the folder
        self.locations.extend(locs)


def read_onnx(path, external: bool = True) -> tuple[dict[str, str], list[str]]:
    """``(metadata_props as {key: value}, external-data locations in file order, without repeats)``.

    ``external=False`` skips the graph entirely (metadata only). Damage (truncated fields, impossible
    lengths, unknown wire types, non-UTF-8 strings) is one ``RuntimeUserError`` naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            r = _Reader(f, size, external)
            r.message("model", size, 0)
    except (ValueError, UnicodeDecodeError) as e:
        raise RuntimeUserError(f"{path}: not an ONNX model ({e})") from None
    except OSError as e:
        raise RuntimeUserError(f"{path}: cannot read it ({e.strerror or e})") from None
    return r.props, list(dict.fromkeys(r.locations))


def read_onnx_metadata(path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as {key: value}; never reads the graph or the weights."""
    return read_onnx(path, external=False)[0]


def external_data_locations(path) -> list[str]:
    """Every external-data ``location`` an ONNX file names (unchecked: see ``artifact.confined_path``)."""
    return read_onnx(path)[1]


__all__ = ["read_onnx", "read_onnx_metadata", "external_data_locations", "MAX_META_BYTES"]
