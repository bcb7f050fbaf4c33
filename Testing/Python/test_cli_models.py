"""Tests of `medclipsam models download|list` (no network: a loopback HTTP server and a stand-in hub download)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from MedCLIPSAMLib import models
from MedCLIPSAMLib.cli import main


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


@pytest.fixture
def sam_server(tmp_path, tiny_sam_checkpoint, monkeypatch):
    """Serve the tiny SAM checkpoint as sam_vit_b_01ec64.pth on 127.0.0.1 and point the downloader at it."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(tiny_sam_checkpoint, served / "sam_vit_b_01ec64.pth")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("MEDCLIPSAM_SAM_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _trust_tiny_checkpoint(monkeypatch, tiny_sam_checkpoint: Path) -> None:
    """Make the tiny checkpoint's digest the expected vit_b digest for this test."""
    digest = hashlib.sha256(tiny_sam_checkpoint.read_bytes()).hexdigest()
    patched = dataclasses.replace(models.SAM_CHECKPOINTS["vit_b"], sha256=digest)
    monkeypatch.setitem(models.SAM_CHECKPOINTS, "vit_b", patched)


def test_models_list_empty_folder(tmp_path, capsys):
    code = main(["models", "list", "--models-dir", str(tmp_path)])
    output = capsys.readouterr().out
    assert code == 0
    assert "vit_b" in output
    assert "biomedclip" in output


def test_models_download_sam_checksum_mismatch(sam_server, tmp_path, capsys):
    code = main(["models", "download", "--no-clip", "--models-dir", str(tmp_path / "models")])
    assert code == 1
    assert "Checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "models" / "sam" / "sam_vit_b_01ec64.pth").exists()


def test_models_download_then_list(sam_server, tiny_sam_checkpoint, tmp_path, monkeypatch, capsys):
    _trust_tiny_checkpoint(monkeypatch, tiny_sam_checkpoint)
    models_dir = tmp_path / "models"
    assert main(["models", "download", "--no-clip", "--models-dir", str(models_dir)]) == 0
    assert (models_dir / "sam" / "sam_vit_b_01ec64.pth").is_file()

    capsys.readouterr()
    assert main(["models", "list", "--models-dir", str(models_dir)]) == 0
    vit_b_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("vit_b "))
    assert " ok " in vit_b_line


def test_models_list_reports_mismatch(tiny_sam_checkpoint, tmp_path, capsys):
    (tmp_path / "sam").mkdir()
    shutil.copyfile(tiny_sam_checkpoint, tmp_path / "sam" / "sam_vit_b_01ec64.pth")
    code = main(["models", "list", "--models-dir", str(tmp_path)])
    assert code == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_models_download_clip(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def fake_download(repo_id, filename, *, local_dir=None, **kwargs):
        source = tiny_clip_dir / filename
        if repo_id.startswith("microsoft/BiomedCLIP") and filename != "config.json" and source.is_file():
            target = Path(local_dir) / filename
        elif filename == "config.json":
            target = Path(local_dir) / filename
        else:
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    models_dir = tmp_path / "models"
    code = main(["models", "download", "--no-sam", "--models-dir", str(models_dir)])
    assert code == 0
    manifest = json.loads((models_dir / "biomedclip" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["model_id"] == models.DEFAULT_CLIP_ID


def test_models_without_action(capsys):
    assert main(["models"]) == 2
