"""Distributed fine-tuning on 2 gloo processes over loopback: same loss and gradients as one process, end to end.

Every process binds only to 127.0.0.1.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from MedCLIPSAMLib.finetune.losses import LOSS_NAMES, ContrastiveLoss

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
LOCAL_BATCH = 4
CAPTIONS = ["breast ultrasound image showing a tumor", "brain mri slice showing a tumor", "chest x ray of the lungs"]


# gloo picks its network interface from the host name unless GLOO_SOCKET_IFNAME names one: keep it on loopback.
LOOPBACK_ENVIRONMENT = {"GLOO_SOCKET_IFNAME": "lo"} if sys.platform.startswith("linux") else {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _TwoTowers(torch.nn.Module):
    """Linear image and text encoders producing L2-normalised embeddings, like CLIP's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(12, 6).double()
        self.text = torch.nn.Linear(10, 6).double()

    def forward(self, image_inputs, text_inputs):
        return F.normalize(self.image(image_inputs), dim=1), F.normalize(self.text(text_inputs), dim=1)


def _linear_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    image_inputs = torch.randn(WORLD_SIZE * LOCAL_BATCH, 12, generator=generator, dtype=torch.float64)
    text_inputs = torch.randn(WORLD_SIZE * LOCAL_BATCH, 10, generator=generator, dtype=torch.float64)
    return image_inputs, text_inputs


def _clip_inputs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(WORLD_SIZE * LOCAL_BATCH, 3, 224, 224, generator=generator)
    captions = [f"{CAPTIONS[index % 3]} number {index}" for index in range(WORLD_SIZE * LOCAL_BATCH)]
    return images, tokenizer(captions)


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: parameter.grad.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }


def _distributed_worker(rank: int, port: int, clip_dir: str, output_dir: str) -> None:
    """One rank: DDP over gloo, loss over the gathered global batch, gradients saved for the parent to compare."""
    import torch.distributed as dist

    from MedCLIPSAMLib.finetune.distributed import DistributedContext, average_across_ranks, global_batch_loss
    from MedCLIPSAMLib.finetune.trainer import load_trainable_clip

    torch.set_num_threads(1)
    os.environ.update(LOOPBACK_ENVIRONMENT)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    context = DistributedContext(
        rank=rank, world_size=WORLD_SIZE, local_rank=rank, device=torch.device("cpu"), backend="gloo"
    )
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}

    torch.manual_seed(0)
    linear = torch.nn.parallel.DistributedDataParallel(_TwoTowers())
    image_inputs, text_inputs = _linear_inputs()
    for name in LOSS_NAMES:
        linear.zero_grad(set_to_none=True)
        image_features, text_features = linear(image_inputs[rows], text_inputs[rows])
        loss = global_batch_loss(ContrastiveLoss(name), image_features, text_features, context)
        loss.backward()
        results[name] = {"loss": average_across_ranks(loss.item(), context), "gradients": _gradients(linear.module)}

    model, bundle = load_trainable_clip(f"local-dir:{clip_dir}", torch.device("cpu"))
    model.eval()  # no dropout, so that both runs compute the same function
    clip = torch.nn.parallel.DistributedDataParallel(model)
    images, tokens = _clip_inputs(bundle.tokenizer)
    image_features, text_features, _ = clip(images[rows], tokens[rows])
    loss = global_batch_loss(ContrastiveLoss("dhn-nce"), image_features, text_features, context)
    loss.backward()
    results["clip"] = {"loss": average_across_ranks(loss.item(), context), "gradients": _gradients(model)}

    torch.save(results, Path(output_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tiny_clip_dir, tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    output_dir = tmp_path_factory.mktemp("distributed_gradients")
    mp.spawn(
        _distributed_worker, args=(_free_port(), str(tiny_clip_dir), str(output_dir)), nprocs=WORLD_SIZE, join=True
    )
    return [torch.load(output_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def _assert_gradients_close(expected: dict, actual: dict, atol: float) -> None:
    assert set(actual) == set(expected)
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, atol=atol, rtol=1e-5, msg=f"gradient of {name}")


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_two_ranks_match_single_process_linear(distributed_results, loss_name):
    torch.manual_seed(0)
    model = _TwoTowers()
    image_inputs, text_inputs = _linear_inputs()
    image_features, text_features = model(image_inputs, text_inputs)
    loss = ContrastiveLoss(loss_name)(image_features, text_features)
    loss.backward()
    expected = _gradients(model)
    for rank in range(WORLD_SIZE):
        result = distributed_results[rank][loss_name]
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-10)
        _assert_gradients_close(expected, result["gradients"], atol=1e-10)


@pytest.mark.slow
def test_two_ranks_match_single_process_clip(distributed_results, tiny_clip_dir):
    from MedCLIPSAMLib.finetune.trainer import load_trainable_clip

    model, bundle = load_trainable_clip(f"local-dir:{tiny_clip_dir}", torch.device("cpu"))
    model.eval()
    images, tokens = _clip_inputs(bundle.tokenizer)
    image_features, text_features, _ = model(images, tokens)
    loss = ContrastiveLoss("dhn-nce")(image_features, text_features)
    loss.backward()
    expected = _gradients(model)
    assert len(expected) > 10
    for rank in range(WORLD_SIZE):
        result = distributed_results[rank]["clip"]
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
        _assert_gradients_close(expected, result["gradients"], atol=1e-5)


def _write_caption_set(shared_data: Path, folder: Path, per_category: int = 6) -> Path:
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for category, caption in zip(("breast_ultrasound", "brain_mri", "chest_xray"), CAPTIONS):
        sources = sorted((shared_data / category / "images").iterdir())
        for number in range(per_category):
            with Image.open(sources[number % len(sources)]) as image:
                image = image.convert("RGB")
                image.thumbnail((128, 128))
            if number >= len(sources):
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            name = f"{category}_{number}.png"
            image.save(folder / "images" / name)
            rows.append((f"images/{name}", caption))
    with open(folder / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return folder / "pairs.csv"


@pytest.mark.slow
def test_torchrun_finetune_end_to_end(shared_data, tiny_clip_id, tmp_path):
    csv_path = _write_caption_set(shared_data, tmp_path / "data")
    output = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(WORLD_SIZE),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "MedCLIPSAMLib", "finetune",
        "--data", str(csv_path), "--output", str(output), "--clip", tiny_clip_id,
        "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--device", "cpu", "--workers", "0",
    ]  # fmt: skip
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **LOOPBACK_ENVIRONMENT,
    }
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]

    summary = json.loads((output / "history.json").read_text(encoding="utf-8"))
    assert summary["world_size"] == WORLD_SIZE
    assert [record["epoch"] for record in summary["history"]] == [0, 1, 2]
    assert "best epoch" in completed.stdout

    from MedCLIPSAMLib.models import load_clip

    clip = load_clip(f"local-dir:{output / 'model'}", device="cpu")
    features = clip.model.encode_text(clip.tokenizer(CAPTIONS), normalize=True)
    assert features.shape == (3, 512)
