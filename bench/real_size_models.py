"""Real-size model architectures with random weights, saved in the formats the product loads.

The benchmark times the pipeline on these so that every matrix product has the size of the pre-trained models:

* `build_random_biomedclip` writes an open_clip ``local-dir`` folder of the BiomedCLIP architecture. It has a timm
  ``vit_base_patch16_224`` image tower (768 channels, 12 blocks, 224-pixel input) and a BERT-base text tower
  (``BertConfig`` defaults: 768 hidden, 12 layers, vocabulary of 30522 tokens) with an MLP projection. The joint
  space has 512 dimensions and the text context 256 tokens.
  The logit scale is set to the pre-trained model's value (`BIOMEDCLIP_LOGIT_SCALE`).
* `build_random_sam_checkpoint` writes a state-dict checkpoint of SAM ViT-B (``sam_model_registry["vit_b"]``).

The weights are random (seeded), so the outputs mean nothing; the cost of every forward pass is that of the real
models. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

__all__ = ["BERT_VOCABULARY_SIZE", "build_random_biomedclip", "build_random_sam_checkpoint"]

BERT_VOCABULARY_SIZE = 30522
"""Vocabulary size of BERT-base uncased, the `transformers.BertConfig` default."""

_CONTEXT_LENGTH = 256  # BiomedCLIP's text context in tokens
_EMBED_DIM = 512  # BiomedCLIP's joint embedding size
_BIOMEDCLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_BIOMEDCLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BIOMEDCLIP_LOGIT_SCALE = 100.0
"""exp(logit_scale) given to the random model: about the pre-trained BiomedCLIP's value (CLIP training caps the scale at
100), where a fresh open_clip model starts at 1 / 0.07 = 14.3. gScoreCAM's channel weights are a softmax over logits,
so the scale decides how far rounding errors in the embeddings move the map."""

# Words kept whole in the generated vocabulary, so that the benchmark prompts tokenize to a few tokens.
_PROMPT_WORDS = "a an the of in on with and or no image scan breast tumor lesion mass brain glioma mri".split()


def _write_vocabulary(folder: Path) -> None:
    """Write a WordPiece vocabulary of exactly `BERT_VOCABULARY_SIZE` tokens and the tokenizer files made from it."""
    from transformers import BertTokenizer, BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = [chr(code) for code in range(ord("a"), ord("z") + 1)] + [str(digit) for digit in range(10)]
    tokens = special + list(dict.fromkeys(_PROMPT_WORDS + characters)) + [f"##{char}" for char in characters]
    # Filler tokens bring the vocabulary, and so the token embedding table, to the size of BERT-base.
    tokens += [f"unused{number}" for number in range(BERT_VOCABULARY_SIZE - len(tokens))]
    vocabulary_path = folder / "vocab.txt"
    vocabulary_path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    BertTokenizer(str(vocabulary_path), do_lower_case=True).save_pretrained(str(folder))
    BertTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))


def build_random_biomedclip(folder: str | Path, seed: int = 0) -> Path:
    """Write a BiomedCLIP-architecture model with random weights as an open_clip ``local-dir`` folder.

    Reuses the folder when its weights file exists already. Load it with ``load_clip(f"local-dir:{folder}")``.

    Returns:
        The folder as an absolute path.
    """
    import open_clip
    from safetensors.torch import save_file
    from transformers import BertConfig

    folder = Path(folder).expanduser().resolve()
    weights = folder / "open_clip_model.safetensors"
    if weights.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _write_vocabulary(folder)
    BertConfig(max_position_embeddings=512, pad_token_id=0).save_pretrained(str(folder))

    model_cfg = {
        "embed_dim": _EMBED_DIM,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": str(folder),
            "hf_tokenizer_name": str(folder),
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": _CONTEXT_LENGTH,
        },
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(_BIOMEDCLIP_MEAN), "std": list(_BIOMEDCLIP_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    torch.manual_seed(seed)
    # open_clip logs "no CLIP weights found" on the root logger for a model created without weights; the weights are
    # written just below, so that message is expected here.
    root_logger = logging.getLogger()
    previous_level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(f"local-dir:{folder}", pretrained_hf=False, load_weights=False)
    finally:
        root_logger.setLevel(previous_level)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    state["logit_scale"] = torch.full_like(state["logit_scale"], math.log(BIOMEDCLIP_LOGIT_SCALE))
    save_file(state, str(weights))
    return folder


def build_random_sam_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a SAM ViT-B state-dict checkpoint with random weights (reused when the file exists).

    Load it with ``load_sam("vit_b", checkpoint=path)``.

    Returns:
        The checkpoint path as an absolute path.
    """
    from segment_anything import sam_model_registry

    path = Path(path).expanduser().resolve()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sam = sam_model_registry["vit_b"](checkpoint=None)
    torch.save(sam.state_dict(), str(path))
    return path
