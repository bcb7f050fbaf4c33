"""Tiny models of the real architectures, saved in the real on-disk formats.

Tests, the Slicer self-test and offline demos use these instead of the pre-trained weights, which cannot be
downloaded everywhere. They run through exactly the code that loads the real models:

* `build_tiny_biomedclip` writes an open_clip ``local-dir`` folder of the BiomedCLIP architecture (timm ViT image
  tower with 16-pixel patches at 224x224, BERT text tower with an MLP projection and CLS pooling) at a tiny width.
* `build_tiny_sam` writes a segment-anything state-dict checkpoint of the ``tiny`` SAM architecture, which
  `MedCLIPSAMLib.models.load_sam("tiny", checkpoint=...)` builds.

The weights are random (seeded), so the outputs mean nothing medically; the shapes, dtypes and file formats are
those of the real models.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import torch

__all__ = [
    "TINY_SAM_IMAGE_SIZE",
    "TINY_VOCABULARY",
    "build_tiny_biomedclip",
    "build_tiny_sam",
    "build_tiny_sam_model",
]

# Whole-word tokens of the tiny vocabulary. Other words are split into single-letter word pieces.
TINY_VOCABULARY = (
    "a an the of in on with and or no without image scan photo slice view showing shows normal abnormal "
    "breast tumor tumour lesion mass benign malignant cyst ultrasound sonography "
    "brain glioma meningioma pituitary mri magnetic resonance t1 t2 contrast enhanced "
    "lung lungs left right chest x ray xray radiograph pneumonia covid opacity consolidation "
    "liver kidney spleen heart abdomen ct computed tomography bone vessel organ region tissue "
    "red blue cat dog car tree house background noise"
).split()

TINY_SAM_IMAGE_SIZE = 256
"""Input side of the tiny SAM image encoder in pixels (the real models use 1024)."""

_TINY_TEXT_CONTEXT = 256  # BiomedCLIP's text context length in tokens
_TINY_EMBED_DIM = 512  # joint embedding size, as in BiomedCLIP
_BIOMEDCLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_BIOMEDCLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _write_tokenizer(folder: Path) -> None:
    """Write a BERT WordPiece tokenizer (vocab.txt, tokenizer.json, tokenizer_config.json) into `folder`."""
    from transformers import BertTokenizer, BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    digits = [str(digit) for digit in range(10)]
    punctuation = list(".,;:!?-()'\"/")
    pieces = [f"##{character}" for character in letters + digits]
    tokens = special + list(dict.fromkeys(TINY_VOCABULARY + letters + digits + punctuation)) + pieces
    vocab_path = folder / "vocab.txt"
    vocab_path.write_text("\n".join(tokens) + "\n", encoding="utf-8")

    # NOTE: with transformers 5, a folder with only vocab.txt and a hand-written tokenizer_config.json fails to
    # load. Saving through the tokenizer classes writes a complete set of files instead.
    BertTokenizer(str(vocab_path), do_lower_case=True).save_pretrained(str(folder))
    BertTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))


def _tiny_bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=_TINY_TEXT_CONTEXT,
        pad_token_id=0,
    )


def build_tiny_biomedclip(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny BiomedCLIP-architecture model as an open_clip ``local-dir`` folder.

    The folder contains ``open_clip_config.json``, ``open_clip_model.safetensors``, the tokenizer files and the text
    encoder's ``config.json`` at its top level, like the Hugging Face hub's BiomedCLIP repository, so that
    ``open_clip.create_model_from_pretrained(f"local-dir:{folder}")`` and
    `MedCLIPSAMLib.models.load_clip` load it with no network.

    Args:
        folder: Output folder; created if missing, existing files of the same names are replaced.
        seed: Seed of the random weights; the same seed writes the same weights.

    Returns:
        The folder as an absolute path.
    """
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(folder)
    vocab_size = len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())
    _tiny_bert_config(vocab_size).save_pretrained(str(folder))

    # The text tower is located by path: open_clip reads the BERT config.json from hf_model_name, and for a
    # local-dir model always reads the tokenizer from the folder itself.
    model_cfg = {
        "embed_dim": _TINY_EMBED_DIM,
        "vision_cfg": {
            "timm_model_name": "test_vit",
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
            "context_length": _TINY_TEXT_CONTEXT,
        },
    }
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(_BIOMEDCLIP_MEAN), "std": list(_BIOMEDCLIP_STD)},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    torch.manual_seed(seed)
    # open_clip logs "no CLIP weights found" on the root logger here, which is expected: the weights are written
    # below. Silence that one call so that users do not read it as a failure.
    root_logger = logging.getLogger()
    previous_level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(f"local-dir:{folder}", pretrained_hf=False, load_weights=False)
    finally:
        root_logger.setLevel(previous_level)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def build_tiny_sam_model():
    """Build the ``tiny`` SAM architecture with random weights.

    Same modules as SAM ViT-B (windowed ViT image encoder with relative positions and one global-attention
    block, prompt encoder, two-way transformer mask decoder) at a 256-pixel input, 64 channels and 2 blocks.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    prompt_dim = 32
    patch = 16
    grid = TINY_SAM_IMAGE_SIZE // patch
    image_encoder = ImageEncoderViT(
        depth=2,
        embed_dim=64,
        img_size=TINY_SAM_IMAGE_SIZE,
        mlp_ratio=2.0,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=2,
        patch_size=patch,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=(1,),
        window_size=4,
        out_chans=prompt_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(TINY_SAM_IMAGE_SIZE, TINY_SAM_IMAGE_SIZE),
        mask_in_chans=8,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
        transformer_dim=prompt_dim,
        iou_head_depth=2,
        iou_head_hidden_dim=32,
    )
    sam = Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)
    return sam.eval()


def build_tiny_sam(path: str | Path, seed: int = 0) -> Path:
    """Write a ``tiny`` SAM checkpoint: a plain state dict saved with `torch.save`, like the official files.

    Returns:
        The checkpoint path as an absolute path.
    """
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sam = build_tiny_sam_model()
    torch.save(sam.state_dict(), str(path))
    return path
