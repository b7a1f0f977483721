"""Backend adapters (installed as ``qlm_plugin.adapters``): one sub-package per backend."""
