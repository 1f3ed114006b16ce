"""What the client decides without a coordinator: digests, manifests, paths, checks, URLs.

Run with ``python -m unittest discover clients/python/tests`` against the installed package
(the end-to-end tests in ``tests/tests/python_client.rs`` run it).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import unittest
from dataclasses import dataclass
from pathlib import Path

from distillery_client import ArtifactError, Client, campaign_dict, campaign_pb2, parse_digest
from distillery_client.artifacts import parse_manifest, receive_to_file, safe_join
from distillery_client.client import _target


@dataclass
class Chunk:
    data: bytes
    digest: str = ""


def chunks(data: bytes, size: int, digest: str = "") -> list[Chunk]:
    parts = [Chunk(data[i : i + size]) for i in range(0, len(data), size)] or [Chunk(b"")]
    parts[-1].digest = digest
    return parts


class Digests(unittest.TestCase):
    def test_forms(self) -> None:
        d = "ab" * 32
        self.assertEqual(parse_digest(d), d)
        self.assertEqual(parse_digest("sha256:" + d.upper()), d)
        for bad in ["../../etc/passwd", "g" * 64, "ab" * 31, "sha256:", "sha512:" + d]:
            with self.assertRaises(ArtifactError, msg=bad):
                parse_digest(bad)


class Manifests(unittest.TestCase):
    def test_only_versioned_well_formed_manifests_count(self) -> None:
        good = {
            "distillery_dir": 1,
            "files": [{"path": "a/b.json", "digest": "ab" * 32, "size": 3}],
        }
        entries = parse_manifest(json.dumps(good).encode())
        self.assertIsNotNone(entries)
        assert entries is not None
        self.assertEqual([(e.path, e.size) for e in entries], [("a/b.json", 3)])
        for blob in [
            b"\x00\x01 not json",
            b"[1, 2]",
            json.dumps({"files": []}).encode(),
            json.dumps({"distillery_dir": 2, "files": []}).encode(),
            json.dumps({"distillery_dir": 1, "files": [{"path": "x"}]}).encode(),
        ]:
            self.assertIsNone(parse_manifest(blob), blob)

    def test_paths_cannot_escape(self) -> None:
        root = Path("/tmp/x")
        self.assertEqual(safe_join(root, "a/b.json"), root / "a" / "b.json")
        for bad in ["../a", "/etc/passwd", "a/../../b", "", "./a", "a//b", "a\\..\\b", "a/\0"]:
            with self.assertRaises(ArtifactError, msg=bad):
                safe_join(root, bad)


class Transfers(unittest.TestCase):
    def test_round_trip_and_mismatch_leave_nothing_behind(self) -> None:
        data = bytes(i % 251 for i in range(3 * 1024 + 17))
        digest = hashlib.sha256(data).hexdigest()
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp) / "sub" / "out.bin"
            got = receive_to_file(chunks(data, 1024, "sha256:" + digest), dest, digest)
            self.assertEqual(got, (digest, len(data)))
            self.assertEqual(dest.read_bytes(), data)

            bad = chunks(data, 1024)
            bad[1].data = b"X" + bad[1].data[1:]
            dest2 = Path(tmp) / "bad.bin"
            with self.assertRaises(ArtifactError):
                receive_to_file(bad, dest2, digest)
            # A digest the server announces is checked too, even when the expected one matches.
            dest3 = Path(tmp) / "announced.bin"
            with self.assertRaises(ArtifactError):
                receive_to_file(chunks(data, 1024, "cd" * 32), dest3, digest)
            self.assertEqual(sorted(p.name for p in Path(tmp).iterdir()), ["sub"])
            self.assertEqual([p.name for p in (Path(tmp) / "sub").iterdir()], ["out.bin"])


class Urls(unittest.TestCase):
    def test_targets(self) -> None:
        self.assertEqual(_target("http://127.0.0.1:7070"), ("127.0.0.1:7070", False))
        self.assertEqual(_target("https://coord.example:443/"), ("coord.example:443", True))
        self.assertEqual(_target("http://[::1]:7070"), ("[::1]:7070", False))
        self.assertEqual(_target("http://coord"), ("coord:80", False))
        for bad in ["127.0.0.1:7070", "grpc://x:1", "http://u@x:1", "http://x:1/path", "http://"]:
            with self.assertRaises(ValueError, msg=bad):
                _target(bad)

    def test_tokens_and_ca_need_the_right_url(self) -> None:
        with self.assertRaises(ValueError):
            Client("http://127.0.0.1:1", token="bad\ntoken")
        with self.assertRaises(ValueError):
            Client("http://127.0.0.1:1", ca_cert=b"pem")
        with self.assertRaises(ValueError):
            Client("https://127.0.0.1:1", ca_cert="/no/such/ca.pem")


class StatusJson(unittest.TestCase):
    def test_every_round_names_its_judge_mode_and_whether_it_compares_with_mt_bench(self) -> None:
        for mode, comparable in [("mtbench", True), ("pairwise", False), ("mtbench-pairwise", False)]:
            c = campaign_pb2.Campaign(id="c1", name="n", state=campaign_pb2.CAMPAIGN_STATE_RUNNING)
            c.spec.evaluation.judge.mode = mode
            c.rounds.add(index=0, state="running", phase="judge")
            judge = campaign_dict(c)["rounds"][0]["metrics"]["judge"]
            self.assertEqual(judge["mode"], mode)
            self.assertEqual(judge["mtbench_comparable"], comparable)
            label = judge["comparability"]
            if comparable:
                self.assertIn("comparable with published MT-Bench", label)
            else:
                self.assertEqual(label, "not comparable with published MT-Bench")
        # Without a judge there is nothing to label.
        c = campaign_pb2.Campaign(id="c2", name="n")
        c.rounds.add(index=0)
        self.assertNotIn("mode", campaign_dict(c)["rounds"][0]["metrics"]["judge"])

    def test_metrics_nest_and_fixed_keys_exist(self) -> None:
        c = campaign_pb2.Campaign(id="c1", name="n", state=campaign_pb2.CAMPAIGN_STATE_SUCCEEDED)
        r = c.rounds.add(index=0, state="succeeded", phase="done")
        r.metrics["judge.win_rate"] = 0.5
        r.metrics["params"] = 1234.0
        r.metrics["distill.steps"] = 8.0
        r.artifacts["pruned"] = "sha256:" + "ab" * 32
        r.target.num_layers = 2
        v = campaign_dict(c)
        self.assertEqual(v["state"], "succeeded")
        self.assertIsNone(v["error"])
        round0 = v["rounds"][0]
        self.assertEqual(round0["params"], 1234)
        self.assertEqual(round0["artifacts"], {"pruned": "sha256:" + "ab" * 32, "student": None})
        self.assertEqual(round0["metrics"]["judge"]["win_rate"], 0.5)
        self.assertIsNone(round0["metrics"]["judge"]["wins"])
        self.assertEqual(round0["metrics"]["distill"]["steps"], 8.0)
        self.assertIsNone(round0["metrics"]["perplexity"])
        self.assertEqual(
            round0["target"],
            {
                "hidden_size": None,
                "intermediate_size": None,
                "num_attention_heads": None,
                "num_layers": 2,
                "params": None,
            },
        )


if __name__ == "__main__":
    unittest.main()
