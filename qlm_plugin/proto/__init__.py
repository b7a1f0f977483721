"""The control plane's protocol: ``qlm/v1/qlm.proto`` and its generated Python code.

Import the messages and stubs from :mod:`qlm_plugin.proto.qlm.v1`; regenerate them with
``python -m qlm_plugin.proto.regenerate`` after editing the ``.proto``.
"""
