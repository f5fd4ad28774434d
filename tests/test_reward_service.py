"""The reward service on a real Ray Serve instance, over real HTTP and through a DeploymentHandle; and a reward
backend defined and registered in this module, served end to end without touching a project file."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from typing import Literal

import av
import httpx
import numpy as np
import pytest
import torch
from ray import serve
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import launch
from core.config import REPO_ROOT, RewardBackendConfig, load_config
from core.records.video_io import write_mp4
from core.reward.base import AXES, Normalization, RewardScore, SamplingInfo, VideoInput
from core.reward.registry import register_backend
from gated_reward import Gate
from reward_service.app import build_app
from reward_service.client import RewardError, RewardHandleClient, RewardHTTPClient

SMALL_LIMITS = ["reward_service.max_body_mb=1", "reward_service.max_frames=64", "reward_service.max_pixels=16384",
                "reward_service.max_duration_s=10", "reward_service.num_cpus=0.1"]


def moving_square(frames: int = 16, size: int = 64) -> np.ndarray:
    video = np.full((frames, size, size, 3), 40, dtype=np.uint8)
    for t in range(frames):
        x = 4 + 2 * t
        video[t, 20:36, x:x + 16] = (220, 60, 60)
    return video


@pytest.fixture(scope="module")
def tight_gate(tmp_path_factory) -> Gate:
    """The gate of the `tight` app's scores (tests/gated_reward.py), open until a test closes it."""
    gate = Gate(tmp_path_factory.mktemp("tight_gate"))
    gate.open()
    return gate


@pytest.fixture(scope="module")
def services(serve_instance, tmp_path_factory, tight_gate):
    """Three apps on one Serve instance: open, bearer-token protected, and with a tiny queue (its scores held at a
    gate the test opens)."""
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text("s3cret\n")
    apps = {
        "open": ("/", []),
        "secure": ("/secure", [f"reward_service.auth_token_file={token_file}"]),
        "tight": ("/tight", ["reward_service.max_ongoing_requests=1", "reward_service.max_queued_requests=1",
                             "reward_service.max_batch_size=1", "reward_service.retry_after_s=2",
                             "reward.backend=gated", f"reward.gate={tight_gate.folder}"]),
    }
    for name, (prefix, overrides) in apps.items():
        overrides = SMALL_LIMITS + overrides + [f"reward_service.app_name={name}"]
        cfg = load_config(REPO_ROOT / "configs" / "reward_service.yaml", overrides)
        serve.run(build_app(cfg), name=name, route_prefix=prefix)
    yield serve_instance
    for name in apps:
        serve.delete(name)


def test_scores_mp4_and_raw_frames_alike(services, tmp_path):
    video = moving_square()
    path = tmp_path / "square.mp4"
    write_mp4(path, video, fps=8)
    with RewardHTTPClient(services) as client:
        from_file = client.score_file(path, "a red square moves right")
        from_frames = client.score_frames(video, 8, "a red square moves right")
    for result in (from_file, from_frames):
        assert set(result) >= {"VQ", "MQ", "TA", "Overall", "raw", "normalized", "sampling", "backend", "latency_ms"}
        assert result["backend"] == "motion"
        assert result["Overall"] == pytest.approx(sum(result["normalized"][k] for k in ("VQ", "MQ", "TA")))
        assert result["sampling"]["source_frames"] == 16 and result["sampling"]["source_fps"] == pytest.approx(8)
    assert from_file["MQ"] == pytest.approx(from_frames["MQ"], abs=0.1)  # H.264 loss only
    static = RewardHTTPClient(services).score_frames(np.repeat(video[:1], 16, axis=0), 8, "a red square")
    assert static["MQ"] < from_frames["MQ"]


def write_webm(path, video: np.ndarray, fps: int = 8) -> None:
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in video:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))


def test_webm_body_and_info_and_docs(services, tmp_path):
    path = tmp_path / "square.webm"
    write_webm(path, moving_square())
    r = httpx.post(f"{services}/v1/score", params={"prompt": "square"}, content=path.read_bytes(),
                   headers={"Content-Type": "video/webm"})
    assert r.status_code == 200, r.text
    info = httpx.get(f"{services}/v1/info").json()
    assert info["backend"] == "motion" and info["limits"]["max_frames"] == 64 and info["auth"] is False
    assert info["batching"]["max_batch_size"] == 8
    assert httpx.get(f"{services}/healthz").json() == {"status": "ok"}
    assert "/v1/score" in httpx.get(f"{services}/openapi.json").json()["paths"]
    assert httpx.get(f"{services}/docs").status_code == 200


def test_openapi_describes_every_body_score_accepts(services, tmp_path):
    """/openapi.json says what POST /v1/score takes: a request built from each body type it lists, with the
    parameters and form fields it names, is scored (and answers the schema it promises); an unlisted type is not."""
    op = httpx.get(f"{services}/openapi.json").json()["paths"]["/v1/score"]["post"]
    params = {p["name"]: p for p in op["parameters"]}
    assert all(p["in"] == "query" for p in params.values())
    content = op["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "video/mp4", "video/webm", "video/quicktime", "video/x-matroska",
                            "application/octet-stream"}
    video = moving_square()
    write_mp4(tmp_path / "v.mp4", video, fps=8)
    write_webm(tmp_path / "v.webm", video)
    files = {"mp4": (tmp_path / "v.mp4").read_bytes(), "webm": (tmp_path / "v.webm").read_bytes()}
    values = {"prompt": "a red square moves right", "frames": 16, "height": 64, "width": 64, "fps": 8.0}
    types = {"string": str, "integer": int, "number": float}
    for name, value in values.items():  # what the test sends fits what the schema declares
        assert isinstance(value, types[params[name]["schema"]["type"]]), name
    promised = op["responses"]["200"]["content"]["application/json"]["schema"]["required"]
    for kind, media in content.items():
        schema = media["schema"]
        if kind == "multipart/form-data":
            assert set(schema["required"]) == {"video", "prompt"} and schema["properties"]["video"]["format"] == "binary"
            r = httpx.post(f"{services}/v1/score", files={"video": ("v.mp4", files["mp4"], "video/mp4")},
                           data={"prompt": values["prompt"]})
        else:
            assert schema == {**schema, "type": "string", "format": "binary"}
            named = [n for n, p in params.items() if kind in p["description"] or n == "prompt"]
            container = "webm" if kind in ("video/webm", "video/x-matroska") else "mp4"  # QuickTime: the MP4 family
            body = video.tobytes() if kind == "application/octet-stream" else files[container]
            r = httpx.post(f"{services}/v1/score", params={n: values[n] for n in named}, content=body,
                           headers={"Content-Type": kind})
        assert r.status_code == 200, (kind, r.text)
        assert set(r.json()) >= set(promised) and r.json()["warnings"] == []  # motion reads no prompt
    r = httpx.post(f"{services}/v1/score", content=b"frames", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "415" in op["responses"]


@pytest.mark.parametrize("case, status, words", [
    ("corrupt", 400, "accepted: MP4"),
    ("not_video", 400, "not a video container"),
    ("too_big_body", 413, "above the limit"),
    ("too_many_frames", 413, "frames"),
    ("too_many_pixels", 413, "pixels"),
    ("wrong_type", 415, "unsupported Content-Type"),
    ("no_prompt", 422, "prompt"),
    ("raw_size_mismatch", 422, "bytes"),
    ("raw_bad_fps", 422, "fps"),
    ("multipart_no_video", 422, "video"),
    ("raw_infinite_fps", 422, "finite"),
    ("multipart_no_length", 411, "Content-Length"),
])
def test_bad_input_gets_its_status_and_a_message(services, tmp_path, case, status, words):
    url = f"{services}/v1/score"
    raw = {"Content-Type": "application/octet-stream"}
    good_mp4 = tmp_path / "ok.mp4"
    write_mp4(good_mp4, moving_square(), fps=8)
    requests = {
        "corrupt": dict(files={"video": ("v.mp4", good_mp4.read_bytes()[:300], "video/mp4")}, data={"prompt": "x"}),
        "not_video": dict(files={"video": ("v.mp4", b"hello, not a video at all", "video/mp4")}, data={"prompt": "x"}),
        "too_big_body": dict(content=b"\0" * (2 * 2**20), headers=raw,
                             params={"frames": 1, "height": 2, "width": 2, "fps": 8, "prompt": "x"}),
        "too_many_frames": dict(content=b"\0" * 65 * 12, headers=raw,
                                params={"frames": 65, "height": 2, "width": 2, "fps": 8, "prompt": "x"}),
        "too_many_pixels": dict(content=b"\0" * 256 * 256 * 3, headers=raw,
                                params={"frames": 1, "height": 256, "width": 256, "fps": 8, "prompt": "x"}),
        "wrong_type": dict(content=b"a", headers={"Content-Type": "text/plain"}),
        "no_prompt": dict(files={"video": ("v.mp4", good_mp4.read_bytes(), "video/mp4")}),
        "raw_size_mismatch": dict(content=b"\0" * 10, headers=raw,
                                  params={"frames": 1, "height": 2, "width": 2, "fps": 8, "prompt": "x"}),
        "raw_bad_fps": dict(content=b"\0" * 12, headers=raw,
                            params={"frames": 1, "height": 2, "width": 2, "fps": 0, "prompt": "x"}),
        "multipart_no_video": dict(files={"other": ("a.txt", b"a", "text/plain")}, data={"prompt": "x"}),
        "raw_infinite_fps": dict(content=b"\0" * 12, headers=raw,
                                 params={"frames": 1, "height": 2, "width": 2, "fps": "inf", "prompt": "x"}),
        "multipart_no_length": dict(content=iter([b"--b\r\n", b"junk"]),
                                    headers={"Content-Type": "multipart/form-data; boundary=b"}),
    }
    r = httpx.post(url, **requests[case])
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_auth_on_every_route_but_health(services):
    base = f"{services}/secure"
    frames = moving_square(4)
    params = {"frames": 4, "height": 64, "width": 64, "fps": 8, "prompt": "x"}
    raw = {"Content-Type": "application/octet-stream"}
    assert httpx.get(f"{base}/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        r = httpx.post(f"{base}/v1/score", content=frames.tobytes(), params=params, headers={**raw, **headers})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/v1/info", headers=headers).status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert httpx.post(f"{base}/v1/score", content=frames.tobytes(), params=params, headers={**raw, **ok}).status_code == 200
    assert httpx.get(f"{base}/v1/info", headers=ok).json()["auth"] is True
    with pytest.raises(RewardError) as err:
        RewardHTTPClient(base, token="wrong", retries=0).score_frames(frames, 8, "x")
    assert err.value.status == 401
    assert RewardHTTPClient(base, token="s3cret").score_frames(frames, 8, "x")["backend"] == "motion"


def test_overload_gets_503_with_retry_after_and_accepted_requests_succeed(services, tight_gate):
    """The tight app takes one request at a time and queues one more. With the first held in scoring (at the gate),
    of two more requests one is queued and the other refused at once with 503 and Retry-After; once the gate
    opens, the accepted ones are scored."""
    video = moving_square()
    params = {"frames": video.shape[0], "height": 64, "width": 64, "fps": 8, "prompt": "a red square"}

    def post():
        return httpx.post(f"{services}/tight/v1/score", content=video.tobytes(), params=params,
                          headers={"Content-Type": "application/octet-stream"}, timeout=120)

    tight_gate.close()
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            entered = tight_gate.entered()
            first = pool.submit(post)
            tight_gate.wait_entered(entered + 1)  # scoring: the replica's one slot is taken until the gate opens
            more = [pool.submit(post), pool.submit(post)]
            done, waiting = concurrent.futures.wait(more, timeout=60, return_when=concurrent.futures.FIRST_COMPLETED)
            assert len(done) == 1 and len(waiting) == 1, "neither request was refused while the slot was held"
            refused = done.pop().result()
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2", refused.text
            tight_gate.open()
            accepted = [first.result(timeout=120), waiting.pop().result(timeout=120)]
    finally:
        tight_gate.open()
    assert [r.status_code for r in accepted] == [200, 200] and all(np.isfinite(r.json()["Overall"]) for r in accepted)


def test_handle_client_scores_uint8_arrays_without_http(services):
    video = moving_square()

    async def run():
        client = RewardHandleClient("open", timeout_s=30, retries=1)
        from_numpy = await client.score(video, 8.0, "a red square")
        from_torch = await client.score(torch.from_numpy(video), 8.0, "a red square")
        with pytest.raises(RewardError, match="rejected the input"):
            await client.score(video[..., :2], 8.0, "bad shape")
        with pytest.raises(RewardError, match="rejected the input"):
            await client.score(np.zeros((100, 8, 8, 3), np.uint8), 8.0, "above max_frames")
        return from_numpy, from_torch

    from_numpy, from_torch = asyncio.run(run())
    assert from_numpy == from_torch
    http = RewardHTTPClient(services).score_frames(video, 8, "a red square")
    assert http["MQ"] == pytest.approx(from_numpy["MQ"])


def test_score_cli(services, tmp_path, capsys):
    path = tmp_path / "v.mp4"
    write_mp4(path, moving_square(), fps=8)
    assert launch.main(["score", str(path), "--prompt", "a red square", "--url", services]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "motion"
    assert launch.main(["score", str(tmp_path / "missing.mp4"), "--prompt", "x", "--url", services]) == 1
    assert "no video file" in capsys.readouterr().err


def test_serve_deploy_file_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    spec = ServeDeploySchema.model_validate(yaml.safe_load(open(REPO_ROOT / "deploy" / "serve_reward.yaml")))
    app = spec.applications[0]
    assert app.import_path == "reward_service.app:app_builder"
    load_config(REPO_ROOT / app.args["config"], app.args["overrides"])


# ----------------------------------------------------------------------------- a backend of this module's own


class BrightnessConfig(RewardBackendConfig):
    """The `reward:` section of the backend below: its name and its one key."""

    backend: Literal["brightness"] = "brightness"
    scale: float = 1.0


class BrightnessScorer:
    """VQ = scale x the mean pixel value / 255: a reward backend that is not part of the project."""

    name = "brightness"

    def __init__(self, scale: float):
        self.scale = scale
        # a word-level tokenizer, as a backend that reads prompts has one: the service names the words it cannot read
        words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "grey": 2, "frame": 3}, unk_token="<unk>"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")

    @classmethod
    def from_config(cls, cfg: BrightnessConfig) -> "BrightnessScorer":
        return cls(cfg.scale)

    def score_batch(self, videos: list[VideoInput]) -> list[RewardScore]:
        unit = Normalization(mean=dict.fromkeys(AXES, 0.0), std=dict.fromkeys(AXES, 1.0))
        return [RewardScore.from_raw({"VQ": self.scale * float(v.frames.mean()) / 255, "MQ": 0.0, "TA": 0.0}, unit,
                                     SamplingInfo(v.fps, len(v.frames), len(v.frames), v.frames.shape[1:3]))
                for v in videos]

    def info(self) -> dict:
        return {"backend": self.name, "scale": self.scale}


register_backend(BrightnessConfig, BrightnessScorer)  # on import: here, and in the replica that unpickles the config


def test_a_backend_registered_by_a_user_module_is_served_over_http(serve_instance):
    cfg = load_config(REPO_ROOT / "configs" / "reward_service.yaml",
                      ["reward.backend=brightness", "reward.scale=2", "reward_service.app_name=brightness",
                       "reward_service.num_cpus=0.1"])
    assert isinstance(cfg.reward, BrightnessConfig) and cfg.reward.scale == 2.0
    serve.run(build_app(cfg), name="brightness", route_prefix="/brightness")
    try:
        with RewardHTTPClient(f"{serve_instance}/brightness") as client:
            assert client.info()["scale"] == 2.0
            grey = np.full((6, 32, 32, 3), 51, dtype=np.uint8)
            result = client.score_frames(grey, 8, "a grey frame")
        assert result["backend"] == "brightness" and result["raw"]["VQ"] == pytest.approx(0.4)
        assert result["sampling"]["source_frames"] == 6 and result["Overall"] == pytest.approx(0.4)
        assert result["warnings"] == []
        with RewardHTTPClient(f"{serve_instance}/brightness") as client:
            (warning,) = client.score_frames(grey, 8, "a grey corgi frame")["warnings"]
        assert warning.endswith("reads these words as unknown: corgi") and "brightness" in warning
    finally:
        serve.delete("brightness")
