"""TensorRT: ``engine`` (``rwkv-export build-engine``), ``loader`` (the one way an engine is built from an
export: plugin registration, strongly typed parse, optimisation profile; used by build-engine and by
``validate --backend tensorrt``), ``plugin`` (locating and building the plugin libraries) and
``polygraphy_run`` (Polygraphy's CLI with the plugins registered first)."""
