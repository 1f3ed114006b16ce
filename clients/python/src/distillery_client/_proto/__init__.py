"""Stubs generated from ``proto/distillery/v1/*.proto`` when the package is installed.

Nothing here is committed but this file: ``pip install clients/python`` runs grpcio-tools (see
``setup.py``) and writes ``spec_pb2``, ``campaign_pb2``, ``worker_pb2`` (with ``.pyi`` stubs),
their ``*_pb2_grpc`` modules and ``_build`` (the digest of the sources they came from).
"""
