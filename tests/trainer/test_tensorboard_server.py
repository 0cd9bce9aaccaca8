"""A real TensorBoard over short real runs, checked through its HTTP API.

Two VAE jobs (`termwise.models.vae.train_and_evaluate`, 30 steps on the digits without their
labels, so no FID classifier is trained) write `runs/vae` and `runs/vae_pcgrad`; one TensorBoard
serves the run directory itself (the README's `tensorboard --logdir runs/vae`, whose run is
named "."), another the folder of both runs. Both start at once, on free ports of 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from sklearn.datasets import load_digits

from termwise.models import vae
from termwise.models.config import RunConfig
from termwise.trainer import balancers, summaries
from termwise.trainer.summaries import read_events, scalar_series

STEPS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    """`tensorboard --logdir LOGDIR` on 127.0.0.1, as a subprocess; JSON over HTTP."""

    def __init__(self, logdir, log_path):
        self.port = free_port()
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                f"--logdir={logdir}",
                "--host=127.0.0.1",
                f"--port={self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def read(self, path: str, **query) -> bytes:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()

    def get(self, path: str, **query):
        return json.loads(self.read(path, **query))

    def post(self, path: str, body: dict):
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def session_groups(self) -> list[dict]:
        request = {
            "experimentName": "",
            "allowedStatuses": [
                "STATUS_UNKNOWN",
                "STATUS_SUCCESS",
                "STATUS_FAILURE",
                "STATUS_RUNNING",
            ],
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 100,
        }
        return self.post("/data/plugin/hparams/session_groups", request).get("sessionGroups", [])

    def wait_until(self, ready, timeout: float = 120.0):
        """Polls `ready(self)` (errors count as not yet) until it returns something true."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"TensorBoard exited with {self.process.returncode}")
            with contextlib.suppress(OSError, ValueError, KeyError):
                result = ready(self)
                if result:
                    return result
            if time.monotonic() > deadline:
                raise AssertionError(f"TensorBoard at {self.url} not ready in {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def unlabelled_digits(directory) -> str:
    """The digits as PATH.npz with images only: the VAE job then computes no FID."""
    images = (load_digits().images / 16.0).astype("float32")
    path = os.path.join(directory, "digits.npz")
    np.savez(path, x=images)
    return path


def run_vae(log_dir: str, dataset: str, **options) -> dict:
    config = RunConfig(
        steps=STEPS,
        batch_size=64,
        log_dir=log_dir,
        dataset=dataset,
        log_every=10,
        grad_log_every=10,
        validation_every=10,
        checkpoint_every=0,
        progress=False,
        **options,
    )
    return vae.train_and_evaluate(config, latent_dim=4)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorboard")
    runs = root / "runs"
    dataset = unlabelled_digits(root)
    results = {
        "vae": run_vae(str(runs / "vae"), dataset),
        "vae_pcgrad": run_vae(str(runs / "vae_pcgrad"), dataset, balancer="pcgrad"),
    }
    run_dir = TensorBoard(runs / "vae", root / "run_dir.log")
    parent = TensorBoard(runs, root / "parent.log")
    try:
        yield {"run_dir": run_dir, "parent": parent, "runs": runs, "results": results}
    finally:
        run_dir.stop()
        parent.stop()


def test_runs_and_per_term_tags(servers):
    tb = servers["run_dir"]
    runs = tb.wait_until(lambda t: len(t.get("/data/runs")) >= 3 and t.get("/data/runs"))
    assert sorted(runs) == [".", "terms/kl", "terms/reconstruction"]
    tags = tb.wait_until(lambda t: t.get("/data/plugin/scalars/tags"))
    for term in ("kl", "reconstruction"):
        assert sorted(tags[f"terms/{term}"]) == sorted(
            f"by_term/train/{q}" for q in summaries.PER_TERM
        )
        assert {f"loss/{term}", f"share/{term}", f"grad_share/{term}"} <= set(tags["."])
    assert "grad_cosine/reconstruction~kl" in tags["."]
    # Custom Scalars: each chart of the phase's category selects one tag of every term run
    # (a line per term) and none of the run ".".
    layout = tb.get("/data/plugin/custom_scalars/layout")
    (category,) = [c for c in layout["category"] if c["title"] == "terms of phase train"]
    assert len(category["chart"]) == len(summaries.PER_TERM)
    for chart in category["chart"]:
        (regex,) = chart["multiline"]["tag"]
        matches = {run: [t for t in tags[run] if re.search(regex, t)] for run in runs}
        assert matches.pop(".") == [] and all(len(m) == 1 for m in matches.values()), chart
    # A term's line is the flat tag's values, step by step.
    points = tb.get("/data/plugin/scalars/scalars", run="terms/kl", tag="by_term/train/share")
    flat = scalar_series(read_events(servers["runs"] / "vae"), "share/kl")
    assert [(p[1], p[2]) for p in points] == [(s, pytest.approx(v, rel=1e-6)) for s, v in flat]
    assert [p[1] for p in points] == [10, 20, 30]
    # Validation every 10 steps: eval/ curves, not a single dot.
    assert [s for s, _ in scalar_series(read_events(servers["runs"] / "vae"), "eval/kl")][:3] == [
        10,
        20,
        30,
    ]


def test_hparams_table_has_metric_values_with_the_readme_command(servers):
    tb = servers["run_dir"]
    (group,) = tb.wait_until(lambda t: t.session_groups())
    experiment = tb.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert metrics == [
        "eval/reconstruction",
        "eval/kl",
        "eval/total",
        "total/train",
        "eval/negative_elbo",
        "eval/fid",
        "eval/fid_floor",
    ]
    values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    results = servers["results"]["vae"]
    for name in ("reconstruction", "kl", "total", "negative_elbo"):
        assert values[f"eval/{name}"] == pytest.approx(results[name], rel=1e-6), name
    assert group["sessions"][0]["name"] == "."
    assert group["hparams"]["balancer"] == "none"
    assert group["hparams"]["weights"] == "kl=linear:0:1:2000"
    names = [h["name"] for h in experiment["hparamInfos"]]
    assert len(names) == len(set(names)) and not [n for n in names if "/" in n]


def test_hparams_of_a_folder_of_runs(servers):
    tb = servers["parent"]
    groups = tb.wait_until(lambda t: len(t.session_groups()) == 2 and t.session_groups())
    experiment = tb.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    assert len(experiment["metricInfos"]) == 7  # declared, not one per scalar tag
    sessions = {g["sessions"][0]["name"]: g for g in groups}
    assert sorted(sessions) == ["vae", "vae_pcgrad"]
    assert sessions["vae"]["hparams"]["balancer"] == "none"
    # The balancer's canonical spec, as `balancers.parse` spells it.
    assert sessions["vae_pcgrad"]["hparams"]["balancer"] == balancers.parse("pcgrad").spec
    for name, group in sessions.items():
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        expected = servers["results"][name]["negative_elbo"]
        assert values["eval/negative_elbo"] == pytest.approx(expected, rel=1e-6), name
        assert sorted(group["hparams"]) == sorted(h["name"] for h in experiment["hparamInfos"])


def test_heatmap_images_and_text(servers):
    from PIL import Image

    tb = servers["run_dir"]
    for tag in ("images/grad_cosine/train", "images/term_layer_share/train"):
        entries = tb.wait_until(
            lambda t, tag=tag: t.get("/data/plugin/images/images", run=".", tag=tag)
        )
        assert [e["step"] for e in entries] == [10, 20, 30]
        png = tb.read("/data/plugin/images/individualImage?" + entries[-1]["query"])
        width, height = Image.open(io.BytesIO(png)).size
        assert width >= 300 and height >= 150, (tag, width, height)
    (summary,) = tb.get("/data/plugin/text/text", run=".", tag="run/summary")
    assert summary["step"] == 0
    for needle in ("Termwise", "TensorFlow", "Keras", "reconstruction", "kl", "linear:0:1:2000"):
        assert needle in summary["text"], needle
