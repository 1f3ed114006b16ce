"""Python client for the Distillery coordinator.

>>> from distillery_client import Client, campaign_dict
>>> with Client("http://127.0.0.1:7070", token="...") as c:
...     cid = c.submit("campaign.toml")
...     for event in c.watch(cid):
...         print(event.seq, event.message)
...     print(campaign_dict(c.status(cid))["state"])
...     c.download_artifact(cid, "student/")

The message classes are generated from ``proto/distillery/v1`` when the package is installed:
``distillery_client.campaign_pb2`` (``Campaign``, ``Event``, ...) and ``distillery_client.spec_pb2``
(``CampaignSpec``, ...).
"""

from ._proto import campaign_pb2, spec_pb2
from .artifacts import parse_digest
from .client import DEFAULT_ADDR, Client, Download
from .errors import ArtifactError, DistilleryError, RpcError
from .status import campaign_dict, is_terminal, state_name

__all__ = [
    "DEFAULT_ADDR",
    "ArtifactError",
    "Client",
    "DistilleryError",
    "Download",
    "RpcError",
    "campaign_dict",
    "campaign_pb2",
    "is_terminal",
    "parse_digest",
    "spec_pb2",
    "state_name",
]
