"""PersonaPlex-7B: its architecture and loading a local checkpoint in the ``nvidia/personaplex-7b-v1`` layout.

Contract: ``load_personaplex(folder)`` returns a ``ModelBundle`` or raises ``CheckpointError`` saying
which file is missing or does not fit; ``build_personaplex_lm`` / ``build_personaplex_mimi`` are the
one place the architecture is built (also for the random-weights benchmark, ``personagate_bench``).
Folder layout: README.md#real-personaplex-weights; speed figures: docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from moshi.models import LMModel, MimiModel
from moshi.models import loaders as moshi_loaders

from .bundle import AGENT_CODEBOOKS, ModelBundle, finish_bundle

log = logging.getLogger(__name__)

# PersonaPlex's fixed Mimi codes for the priming phases (NVIDIA/personaplex moshi/models/lm.py L56-57).
PERSONAPLEX_SILENCE_CODES = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
PERSONAPLEX_SINE_CODES = (430, 1268, 381, 1611, 1095, 1495, 56, 472)

CHECKPOINT_FILES = {
    "model.safetensors": "the PersonaPlex language model weights (safetensors)",
    moshi_loaders.MIMI_NAME: "the Mimi audio codec weights (safetensors)",
    moshi_loaders.TEXT_TOKENIZER_NAME: "the SentencePiece text tokenizer (32k vocabulary)",
}


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing a file or holds one that cannot be used."""


PERSONAPLEX_LM_KWARGS: dict[str, Any] = moshi_loaders._lm_kwargs | {"dep_q": 16}
PERSONAPLEX_DTYPE = torch.bfloat16  # PersonaPlex's loader casts everything to bf16; fp32 7B does not fit 24 GB


def build_personaplex_lm(lm_kwargs: dict[str, Any] | None, device: str | torch.device) -> LMModel:
    """PersonaPlex-7B's language model, unloaded: moshi's 7B layout with 16 depth steps, in bf16.

    The one place that builds the architecture: ``load_personaplex`` builds it on ``meta`` and loads
    the checkpoint into it; the random-weights benchmark (``personagate_bench.random_weights``) builds it on the device with moshi's default
    (seeded) initialisation. ``lm_kwargs`` defaults to PersonaPlex-7B's shapes.
    """
    with torch.device(device):
        lm = LMModel(device=device, dtype=PERSONAPLEX_DTYPE, **dict(lm_kwargs or PERSONAPLEX_LM_KWARGS))
    return lm.eval()


def build_personaplex_mimi(mimi_config: dict[str, Any] | None, device: str | torch.device = "cpu") -> MimiModel:
    """PersonaPlex's Mimi codec (moshi's, 8 codebooks, fp32), unloaded; ``mimi_config`` defaults to
    the real one."""
    return moshi_loaders.get_mimi(None, mimi_config, device=device, num_codebooks=AGENT_CODEBOOKS)


def check_vocabulary(tokenizer: sentencepiece.SentencePieceProcessor, lm_kwargs: dict[str, Any], where: str) -> None:
    """Raise ``CheckpointError`` where the tokenizer has more pieces than the LM has text embeddings."""
    if tokenizer.vocab_size() > lm_kwargs["text_card"]:
        raise CheckpointError(
            f"{where}: vocabulary of {tokenizer.vocab_size()} pieces, expected at most {lm_kwargs['text_card']}"
        )


def personaplex_bundle(
    lm: LMModel,
    mimi: MimiModel,
    tokenizer: sentencepiece.SentencePieceProcessor,
    device: torch.device,
    voices: dict[str, Path | torch.Tensor],
) -> ModelBundle:
    """The bundle of a PersonaPlex-shaped LM and codec, with PersonaPlex's priming codes where the codec
    is the real one (2048 entries per codebook)."""
    silence = torch.tensor(PERSONAPLEX_SILENCE_CODES) if mimi.cardinality == 2048 else None
    sine = torch.tensor(PERSONAPLEX_SINE_CODES) if mimi.cardinality == 2048 else None
    return finish_bundle("personaplex", lm, mimi, tokenizer, device, silence, sine, voices)


def load_personaplex(
    weights_dir: str | Path,
    device: str | torch.device | None = None,
    *,
    lm_kwargs: dict[str, Any] | None = None,
    mimi_config: dict[str, Any] | None = None,
    progress: bool = True,
) -> ModelBundle:
    """Load a local folder in the ``nvidia/personaplex-7b-v1`` layout.

    ``lm_kwargs`` and ``mimi_config`` default to PersonaPlex-7B's shapes; tests pass small ones to run
    the same file handling on a checkpoint they write themselves.
    """
    folder = Path(weights_dir)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: not a folder; expected a local copy of nvidia/personaplex-7b-v1 "
            f"({', '.join(CHECKPOINT_FILES)}, voices/*.pt)"
        )
    for name, what in CHECKPOINT_FILES.items():
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing; expected {what}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.monotonic()

    tok_path = folder / moshi_loaders.TEXT_TOKENIZER_NAME
    tokenizer = sentencepiece.SentencePieceProcessor()
    try:
        tokenizer.Load(str(tok_path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{tok_path}: not a SentencePiece model ({exc})") from exc

    lm_kwargs = dict(lm_kwargs or PERSONAPLEX_LM_KWARGS)
    check_vocabulary(tokenizer, lm_kwargs, str(tok_path))
    lm = build_personaplex_lm(lm_kwargs, "meta")
    _load_safetensors_into(lm, folder / "model.safetensors", device, PERSONAPLEX_DTYPE, progress, "language model")
    lm.eval()

    mimi = build_personaplex_mimi(mimi_config, "cpu")
    _load_safetensors_into(mimi, folder / moshi_loaders.MIMI_NAME, device, None, progress, "Mimi codec")
    mimi.to(device).eval()

    voices: dict[str, Path | torch.Tensor] = {
        p.stem: p for p in sorted((folder / "voices").glob("*")) if p.suffix in (".pt", ".wav", ".flac")
    }
    if not voices:
        hint = "unpack voices.tgz there (tar -xzf voices.tgz)" if (folder / "voices.tgz").is_file() else ""
        log.warning("no voice presets in the checkpoint: sessions must send a voice clip",
                    extra={"folder": str(folder / "voices"), "hint": hint})
    bundle = personaplex_bundle(lm, mimi, tokenizer, device, voices)
    log.info(
        "checkpoint loaded",
        extra={"folder": str(folder), "device": str(device), "seconds": round(time.monotonic() - started, 1),
               "voices": len(voices)},
    )
    return bundle


def _load_safetensors_into(
    module: torch.nn.Module,
    path: Path,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool,
    what: str,
) -> None:
    from safetensors import SafetensorError, safe_open
    from tqdm import tqdm

    expected = module.state_dict()
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            for key in tqdm(keys, desc=f"loading {what}", unit="tensor", disable=not progress, leave=False):
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.dtype.is_floating_point:
                    tensor = tensor.to(dtype)
                state[key] = tensor.to(device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc}); expected {what} weights") from exc
    try:
        _rename_legacy_keys(module, state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: does not match the {what} architecture: {exc}") from exc
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match the {what} architecture: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, want in expected.items():
        if tuple(state[key].shape) != tuple(want.shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(want.shape)} for {what}"
            )
    module.load_state_dict(state, assign=True)


def _rename_legacy_keys(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Bring tensor names of older moshi checkpoints to this moshi's, in place, as ``load_state_dict``
    would: PersonaPlex's files come from moshi 0.1.0, whose attention stores one fused
    ``self_attn.in_proj_weight`` / ``out_proj.weight`` where moshi 0.2 has ``in_projs.{i}`` /
    ``out_projs.{i}``. moshi converts them in load-state-dict pre-hooks; running those hooks first lets
    the name and shape checks compare like with like."""
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        for hook in sub._load_state_dict_pre_hooks.values():
            try:
                hook(state, prefix, {}, True, [], [], [])
            except RuntimeError as exc:  # a fused weight that does not split into the module's steps
                raise ValueError(f"tensors {prefix}* do not fit {type(sub).__name__} ({exc})") from exc
