"""Tests of MedCLIPSAMLib.models on tiny models in the real on-disk formats (no network)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from MedCLIPSAMLib import models
from MedCLIPSAMLib.errors import InvalidInputError, WeightsError

BIOMEDBERT_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"


@pytest.fixture(autouse=True)
def _fresh_cache():
    models.clear_model_cache()
    yield
    models.clear_model_cache()


def _copy_clip_folder(source: Path, destination: Path, hf_model_name: str | None) -> Path:
    shutil.copytree(source, destination)
    if hf_model_name is not None:
        config_path = destination / "open_clip_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["model_cfg"]["text_cfg"]["hf_model_name"] = hf_model_name
        config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = hf_model_name
        config_path.write_text(json.dumps(config), encoding="utf-8")
    return destination


def _encode(bundle: models.ClipBundle, text: str) -> torch.Tensor:
    with torch.no_grad():
        return bundle.model.encode_text(bundle.tokenizer([text]).to(bundle.device))


# ---------------------------------------------------------------------------------------------------------------
# Devices


def test_resolve_device_cpu():
    assert models.resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_auto_exists():
    device = models.resolve_device("auto")
    assert device.type in ("cpu", "cuda", "mps")


def test_resolve_device_unavailable_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available on this machine")
    with pytest.raises(InvalidInputError) as raised:
        models.resolve_device("cuda:1")
    assert "cuda:1" in str(raised.value)
    assert "cpu" in str(raised.value)


def test_resolve_device_unknown_name():
    with pytest.raises(InvalidInputError):
        models.resolve_device("tpu")


def test_default_models_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDCLIPSAM_MODELS_DIR", str(tmp_path))
    assert models.default_models_dir() == tmp_path


# ---------------------------------------------------------------------------------------------------------------
# BiomedCLIP


def test_load_clip_local_dir(tiny_clip_id):
    bundle = models.load_clip(tiny_clip_id, device="cpu")
    assert bundle.model.training is False
    assert bundle.image_size == 224
    assert bundle.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert all(not parameter.requires_grad for parameter in bundle.model.parameters())


def test_load_clip_tokenizer_shape(tiny_clip_id):
    bundle = models.load_clip(tiny_clip_id, device="cpu")
    tokens = bundle.tokenizer(["breast tumor", "brain"])
    assert tokens.dtype == torch.long
    assert tuple(tokens.shape) == (2, 256)


def test_load_clip_text_deterministic(tiny_clip_id):
    bundle = models.load_clip(tiny_clip_id, device="cpu")
    first = _encode(bundle, "a breast ultrasound showing a tumor")
    second = _encode(bundle, "a breast ultrasound showing a tumor")
    assert torch.equal(first, second)


def test_load_clip_cache_same_object(tiny_clip_dir, tiny_clip_id):
    first = models.load_clip(tiny_clip_id, device="cpu")
    second = models.load_clip(str(tiny_clip_dir), device="cpu")
    assert second is first


def test_load_clip_cache_per_dtype(tiny_clip_id):
    float_bundle = models.load_clip(tiny_clip_id, device="cpu")
    bf16_bundle = models.load_clip(tiny_clip_id, device="cpu", dtype=torch.bfloat16)
    assert bf16_bundle is not float_bundle
    assert next(bf16_bundle.model.parameters()).dtype == torch.bfloat16


def test_load_clip_moved_folder_relative_name(tiny_clip_dir, tiny_clip_id, tmp_path):
    moved = _copy_clip_folder(tiny_clip_dir, tmp_path / "renamed_model", ".")
    bundle = models.load_clip(f"local-dir:{moved}", device="cpu")
    reference = models.load_clip(tiny_clip_id, device="cpu")
    assert torch.equal(_encode(bundle, "lung"), _encode(reference, "lung"))


def test_load_clip_hub_text_name_uses_local_config(tiny_clip_dir, tmp_path):
    moved = _copy_clip_folder(tiny_clip_dir, tmp_path / "hub_named", BIOMEDBERT_ID)
    bundle = models.load_clip(str(moved), device="cpu")
    assert bundle.model.training is False


def test_load_clip_stale_absolute_name(tiny_clip_dir, tmp_path):
    moved = _copy_clip_folder(tiny_clip_dir, tmp_path / "stale", str(tmp_path / "deleted_folder"))
    bundle = models.load_clip(str(moved), device="cpu")
    assert bundle.model_id == f"local-dir:{moved.resolve()}"


def test_load_clip_missing_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(WeightsError) as raised:
        models.load_clip(f"local-dir:{missing}", device="cpu", models_dir=tmp_path)
    assert str(missing) in str(raised.value)
    assert "medclipsam models download" in str(raised.value)


def test_load_clip_missing_weights(tiny_clip_dir, tmp_path):
    folder = _copy_clip_folder(tiny_clip_dir, tmp_path / "no_weights", None)
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(WeightsError) as raised:
        models.load_clip(str(folder), device="cpu")
    assert str(folder) in str(raised.value)
    assert "open_clip_model.safetensors" in str(raised.value)


def test_load_clip_corrupt_safetensors(tiny_clip_dir, tmp_path):
    folder = _copy_clip_folder(tiny_clip_dir, tmp_path / "corrupt", None)
    weights = folder / "open_clip_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as raised:
        models.load_clip(str(folder), device="cpu")
    assert str(weights) in str(raised.value)
    assert "--clip local-dir:" in str(raised.value)


def test_load_clip_hub_offline_uncached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as raised:
        models.load_clip("hf-hub:example-org/not-cached-model", device="cpu", models_dir=tmp_path / "models")
    assert "medclipsam models download" in str(raised.value)
    assert "offline mode is on (HF_HUB_OFFLINE)" in str(raised.value)


def test_load_clip_invalid_dtype(tiny_clip_id):
    with pytest.raises(InvalidInputError):
        models.load_clip(tiny_clip_id, device="cpu", dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# SAM


def test_load_sam_tiny(tiny_sam_checkpoint):
    sam = models.load_sam("tiny", checkpoint=tiny_sam_checkpoint, device="cpu")
    assert sam.training is False
    assert sam.image_encoder.img_size == 256


def test_load_sam_tiny_weights_match_file(tiny_sam_checkpoint):
    sam = models.load_sam("tiny", checkpoint=tiny_sam_checkpoint, device="cpu")
    saved = torch.load(tiny_sam_checkpoint, map_location="cpu", weights_only=True)
    assert torch.equal(sam.state_dict()["mask_decoder.iou_token.weight"], saved["mask_decoder.iou_token.weight"])


def test_load_sam_cached(tiny_sam_checkpoint):
    first = models.load_sam("tiny", checkpoint=tiny_sam_checkpoint, device="cpu")
    second = models.load_sam("tiny", checkpoint=tiny_sam_checkpoint, device="cpu")
    assert second is first


def test_load_sam_wrapped_checkpoint(tiny_sam_checkpoint, tmp_path):
    state = torch.load(tiny_sam_checkpoint, map_location="cpu", weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{name}": value for name, value in state.items()}, "epoch": 3}, wrapped)
    sam = models.load_sam("tiny", checkpoint=wrapped, device="cpu")
    assert torch.equal(sam.state_dict()["mask_decoder.iou_token.weight"], state["mask_decoder.iou_token.weight"])


def test_load_sam_truncated_checkpoint(tiny_sam_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pth"
    data = tiny_sam_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as raised:
        models.load_sam("tiny", checkpoint=truncated, device="cpu")
    assert str(truncated) in str(raised.value)


def test_load_sam_missing_checkpoint(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(WeightsError) as raised:
        models.load_sam("vit_b", checkpoint=missing, device="cpu")
    assert str(missing) in str(raised.value)
    assert "medclipsam models download" in str(raised.value)


def test_load_sam_wrong_architecture(tiny_sam_checkpoint):
    with pytest.raises(WeightsError) as raised:
        models.load_sam("vit_b", checkpoint=tiny_sam_checkpoint, device="cpu")
    assert "tiny" in str(raised.value)


def test_load_sam_no_download(tmp_path):
    with pytest.raises(WeightsError) as raised:
        models.load_sam("vit_b", device="cpu", models_dir=tmp_path, download=False)
    assert str(tmp_path / "sam" / "sam_vit_b_01ec64.pth") in str(raised.value)


def test_load_sam_medsam_missing(tmp_path):
    with pytest.raises(WeightsError) as raised:
        models.load_sam("medsam", device="cpu", models_dir=tmp_path)
    assert "medsam_vit_b.pth" in str(raised.value)


def test_load_sam_unknown_type():
    with pytest.raises(InvalidInputError):
        models.load_sam("vit_x", device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# Download over a loopback HTTP server


@pytest.fixture
def file_server(tmp_path):
    """Serve a temporary folder on 127.0.0.1 (port chosen by the OS); yields (folder, base_url)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


def test_download_checksum_mismatch(file_server, tiny_sam_checkpoint, tmp_path, monkeypatch):
    served, base_url = file_server
    shutil.copyfile(tiny_sam_checkpoint, served / "sam_vit_b_01ec64.pth")
    monkeypatch.setenv("MEDCLIPSAM_SAM_BASE_URL", base_url)
    models_dir = tmp_path / "models"
    with pytest.raises(WeightsError) as raised:
        models.download_sam_checkpoint("vit_b", models_dir)
    assert "Checksum mismatch" in str(raised.value)
    assert list((models_dir / "sam").iterdir()) == []


def test_download_verified_and_loads(file_server, tiny_sam_checkpoint, tmp_path, monkeypatch):
    served, base_url = file_server
    shutil.copyfile(tiny_sam_checkpoint, served / "sam_vit_b_01ec64.pth")
    monkeypatch.setenv("MEDCLIPSAM_SAM_BASE_URL", base_url)
    digest = hashlib.sha256(tiny_sam_checkpoint.read_bytes()).hexdigest()
    calls = []
    path = models.download_sam_checkpoint(
        "vit_b", tmp_path / "models", progress=lambda done, total, text: calls.append((done, total)),
        expected_sha256=digest,
    )
    assert path == tmp_path / "models" / "sam" / "sam_vit_b_01ec64.pth"
    assert calls[-1] == (tiny_sam_checkpoint.stat().st_size, tiny_sam_checkpoint.stat().st_size)
    sam = models.load_sam("tiny", checkpoint=path, device="cpu")
    assert sam.training is False


def test_load_sam_download_mismatch(file_server, tiny_sam_checkpoint, tmp_path, monkeypatch):
    served, base_url = file_server
    shutil.copyfile(tiny_sam_checkpoint, served / "sam_vit_b_01ec64.pth")
    monkeypatch.setenv("MEDCLIPSAM_SAM_BASE_URL", base_url)
    with pytest.raises(WeightsError) as raised:
        models.load_sam("vit_b", device="cpu", models_dir=tmp_path / "models")
    assert "Checksum mismatch" in str(raised.value)
    assert not (tmp_path / "models" / "sam" / "sam_vit_b_01ec64.pth").exists()


def test_download_missing_url(file_server, tmp_path, monkeypatch):
    _, base_url = file_server
    monkeypatch.setenv("MEDCLIPSAM_SAM_BASE_URL", base_url)
    with pytest.raises(WeightsError) as raised:
        models.download_sam_checkpoint("vit_l", tmp_path / "models")
    assert "sam_vit_l_0b3195.pth" in str(raised.value)
    assert not (tmp_path / "models" / "sam" / "sam_vit_l_0b3195.pth.part").exists()


def test_download_medsam_rejected(tmp_path):
    with pytest.raises(InvalidInputError):
        models.download_sam_checkpoint("medsam", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Preparing a models folder and listing it


def _fake_hub(tiny_clip_dir: Path, calls: list):
    """Return an hf_hub_download replacement serving the tiny model as the two BiomedCLIP hub repositories."""
    from huggingface_hub.errors import EntryNotFoundError

    clip_repo = models.DEFAULT_CLIP_ID[len("hf-hub:"):]
    hub_config = json.loads((tiny_clip_dir / "open_clip_config.json").read_text(encoding="utf-8"))
    hub_config["model_cfg"]["text_cfg"]["hf_model_name"] = BIOMEDBERT_ID
    hub_config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = BIOMEDBERT_ID

    def fake_download(repo_id, filename, *, local_dir=None, **kwargs):
        calls.append((repo_id, filename))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if repo_id == clip_repo and filename == "open_clip_config.json":
            target.write_text(json.dumps(hub_config), encoding="utf-8")
        elif repo_id == clip_repo and (tiny_clip_dir / filename).is_file() and filename != "config.json":
            shutil.copyfile(tiny_clip_dir / filename, target)
        elif repo_id == BIOMEDBERT_ID and filename == "config.json":
            shutil.copyfile(tiny_clip_dir / "config.json", target)
        else:
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(target)

    return fake_download


def test_download_models_loads_offline(tiny_clip_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls: list = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fake_hub(tiny_clip_dir, calls))
    models_dir = tmp_path / "models"
    prepared = models.download_models(models_dir, sam_types=())
    folder = prepared["clip"]
    assert folder == models_dir / "biomedclip"
    assert (BIOMEDBERT_ID, "pytorch_model.bin") not in calls
    config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == "text_encoder"

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", None)
    moved = shutil.move(str(models_dir), str(tmp_path / "copied_models"))
    bundle = models.load_clip(models.DEFAULT_CLIP_ID, device="cpu", models_dir=moved)
    reference = models.load_clip(f"local-dir:{tiny_clip_dir}", device="cpu")
    assert bundle.model_id == f"local-dir:{Path(moved).resolve() / 'biomedclip'}"
    assert torch.equal(_encode(bundle, "liver"), _encode(reference, "liver"))


def test_download_models_manifest(tiny_clip_dir, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fake_hub(tiny_clip_dir, []))
    folder = models.download_models(tmp_path / "models", sam_types=())["clip"]
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    names = {item["name"] for item in manifest["files"]}
    assert "open_clip_model.safetensors" in names
    assert "text_encoder/config.json" in names
    assert not (folder / ".cache").exists()


def test_list_models_checksum_state(tiny_clip_dir, tiny_sam_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fake_hub(tiny_clip_dir, []))
    models_dir = tmp_path / "models"
    folder = models.download_models(models_dir, sam_types=())["clip"]
    (models_dir / "sam").mkdir()
    shutil.copyfile(tiny_sam_checkpoint, models_dir / "sam" / "sam_vit_b_01ec64.pth")

    entries = {entry["name"]: entry for entry in models.list_models(models_dir)}
    assert entries["biomedclip"]["checksum_ok"] is True
    assert entries["vit_b"]["present"] is True
    assert entries["vit_b"]["checksum_ok"] is False
    assert entries["vit_l"]["present"] is False
    assert entries["vit_l"]["checksum_ok"] is None

    (folder / "vocab.txt").write_text("changed\n", encoding="utf-8")
    entries = {entry["name"]: entry for entry in models.list_models(models_dir)}
    assert entries["biomedclip"]["checksum_ok"] is False


def test_download_models_offline_error(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsError):
        models.download_models(tmp_path / "models", sam_types=())
    assert not (tmp_path / "models" / "biomedclip").exists()
