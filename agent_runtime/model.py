"""Model loading: the tiny in-process model and the PersonaPlex-7B checkpoint.

Both go through the same moshi code path (``LMModel`` + ``MimiModel`` + ``LMGen``);
only the dimensions and where the weights come from differ.
"""

from __future__ import annotations

import copy
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from moshi.models import LMModel, MimiModel
from moshi.models import loaders as moshi_loaders

from personagate_common.protocol import FRAME_RATE, FRAME_SAMPLES, SAMPLE_RATE
from personagate_common.voices import PRESET_VOICES

log = logging.getLogger(__name__)

AGENT_CODEBOOKS = 8  # generated per step; the checkpoint holds 16 depth steps (agent + user)

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


@dataclass
class ModelBundle:
    """Everything a worker needs to run sessions: LM, codec, tokenizer and priming constants."""

    name: str
    lm: LMModel
    mimi: MimiModel
    tokenizer: sentencepiece.SentencePieceProcessor
    device: torch.device
    silence_codes: torch.Tensor  # [8] agent codes of an 80 ms silent frame
    sine_codes: torch.Tensor  # [8] user codes of an 80 ms 440 Hz sine frame (priming's user stream)
    # preset name -> a PersonaPlex .pt / audio file, or (tiny model) a 24 kHz clip in memory
    voices: dict[str, Path | torch.Tensor] = field(default_factory=dict)
    text_pad_id: int = 3
    text_epad_id: int = 0
    # Seeded random weights (the tiny model; PersonaPlex's architecture for speed benchmarks only).
    random_weights: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def lm_sharing_weights(self) -> LMModel:
        """A second LM whose modules (and so streaming state) are its own but whose weights are shared.

        moshi keeps streaming state on the modules themselves, so priming next to a running pool
        needs separate module objects; sharing the tensors keeps the memory cost at zero.
        """
        return _clone_sharing_tensors(self.lm)

    def mimi_sharing_weights(self) -> MimiModel:
        return _clone_sharing_tensors(self.mimi)

    def text_piece(self, token: int) -> str | None:
        """The printable text of one generated text token, or None for padding."""
        tok = self.tokenizer
        if token in (self.text_pad_id, self.text_epad_id) or not 0 <= token < tok.vocab_size():
            return None
        if tok.is_control(token) or tok.is_unknown(token) or tok.is_byte(token):
            return None
        return tok.id_to_piece(token).replace("\u2581", " ")


def _clone_sharing_tensors(module: torch.nn.Module) -> Any:
    if any(getattr(m, "_streaming_state", None) is not None for m in module.modules()):
        raise RuntimeError("cannot clone a module while it is streaming")
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


# --------------------------------------------------------------------------- tiny model

# A call-centre flavoured corpus for the tiny model's SentencePiece tokenizer: the tokenizer is trained
# in-process so that prompts go through the real SentencePiece code path without shipping a binary.
_TINY_CORPUS = """\
You are a claims agent at Harbor Mutual Insurance. Be warm, brief and precise.
Thank you for calling, how can I help you today?
Could you tell me your policy number, please?
I understand, that sounds stressful. Let me look into it for you.
Your claim has been registered and an adjuster will call you within two business days.
You work for Northwind Bank card services and your name is Alex.
If your card was lost or stolen we can block it right away.
Please hold on while I check your account.
Is there anything else I can help you with?
Have a good day and thank you for calling.
I am sorry, I did not catch that. Could you say it again?
The payment was declined because the card has expired.
We can send a replacement card to the address on file.
Your reference number is four seven two nine.
Opening hours are Monday to Friday from eight to six.
Let me transfer you to a colleague who can help with that.
You enjoy having a good conversation.
The weather is lovely today, isn't it?
We received your documents and the repair shop has been approved.
"""

TINY_VOCAB_SIZE = 600


def train_tiny_tokenizer() -> sentencepiece.SentencePieceProcessor:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS.splitlines() * 4),
        model_writer=model,
        vocab_size=TINY_VOCAB_SIZE,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        # moshi's text stream reserves 0 (end of padding) and 3 (padding); keep the same ids.
        unk_id=1,
        bos_id=-1,
        eos_id=2,
        pad_id=3,
        control_symbols=["<epad>"],
        user_defined_symbols=[],
        byte_fallback=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    proc = sentencepiece.SentencePieceProcessor()
    proc.LoadFromSerializedProto(model.getvalue())
    return proc


TINY_MIMI_CONFIG: dict[str, Any] = {
    "sample_rate": SAMPLE_RATE,
    "channels": 1,
    "frame_rate": FRAME_RATE,
    "seanet": moshi_loaders._seanet_kwargs | {"dimension": 32, "n_filters": 4},
    "quantizer": moshi_loaders._quantizer_kwargs
    | {"dimension": 16, "n_q": AGENT_CODEBOOKS, "bins": 256, "input_dimension": 32, "output_dimension": 32},
    "transformer": moshi_loaders._transformer_kwargs
    | {
        "d_model": 32,
        "num_heads": 2,
        "num_layers": 1,
        "dim_feedforward": 64,
        "input_dimension": 32,
        "output_dimensions": [32],
    },
}


def tiny_lm_kwargs(text_card: int) -> dict[str, Any]:
    """PersonaPlex's LM layout (16 depth steps, the same delays) with small dimensions."""
    return moshi_loaders._lm_kwargs | {
        "dim": 64,
        "text_card": text_card,
        "card": TINY_MIMI_CONFIG["quantizer"]["bins"],
        "num_heads": 4,
        "num_layers": 2,
        "hidden_scale": 2,
        "dep_q": 16,
        "depformer_dim": 32,
        "depformer_dim_feedforward": 64,
        "depformer_num_heads": 2,
        "depformer_num_layers": 1,
    }


def load_tiny(seed: int = 1234, device: str | torch.device = "cpu") -> ModelBundle:
    """The tiny model: real moshi modules, small dimensions, seeded random weights, built in-process."""
    device = torch.device(device)
    tokenizer = train_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = moshi_loaders.get_moshi_lm(
            None, lm_kwargs=tiny_lm_kwargs(tokenizer.vocab_size()), device=device, dtype=torch.float32
        )
        mimi = moshi_loaders.get_mimi(None, TINY_MIMI_CONFIG, device=device, num_codebooks=AGENT_CODEBOOKS)
        _randomise_codebooks(mimi, seed)
    bundle = _finish_bundle(
        "tiny", lm, mimi, tokenizer, device, silence=None, sine=None, voices=dict(tiny_voice_presets())
    )
    bundle.random_weights = True
    return bundle


def tiny_voice_presets() -> dict[str, torch.Tensor]:
    """Built-in clips for the tiny model (which has no trained voices): 3 s voiced-sounding tones.

    ``tiny-low`` and ``tiny-high``, and PersonaPlex's preset names (``PRESET_VOICES``), so that a
    persona written for PersonaPlex runs on the tiny model too. Each name has its own pitch and
    timbre: the female voices (``..F.``) between 190 and 320 Hz, the male ones between 100 and 170 Hz;
    the varied ones (``VAR..``) with more vibrato and a faster syllable rhythm than the natural ones.
    """
    presets = {"tiny-low": _voiced_clip(110.0), "tiny-high": _voiced_clip(220.0)}
    for name in PRESET_VOICES:
        varied, female, index = name.startswith("VAR"), name[3] == "F", int(name[4:])
        semitones = 2 * index + (1 if varied else 0)
        presets[name] = _voiced_clip(
            (190.0 if female else 100.0) * 2 ** (semitones / 12),
            vibrato_depth=0.035 if varied else 0.015,
            syllable_hz=3.0 if varied else 2.0,
            tilt=0.8 + 0.2 * index,  # brighter to darker
        )
    return presets


def _voiced_clip(pitch: float, *, vibrato_depth: float = 0.02, syllable_hz: float = 2.0,
                 tilt: float = 1.0, seconds: float = 3.0) -> torch.Tensor:
    """A harmonic tone with vibrato and a syllable-like envelope; harmonic k has amplitude 1/k**tilt."""
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    vibrato = 1 + vibrato_depth * torch.sin(2 * torch.pi * 5 * t)
    phase = 2 * torch.pi * pitch * torch.cumsum(vibrato, 0) / SAMPLE_RATE
    harmonics = sum(torch.sin(k * phase) / k**tilt for k in range(1, 8))
    envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * syllable_hz * t).abs()
    return (0.2 * harmonics * envelope).float()


def _randomise_codebooks(mimi: MimiModel, seed: int) -> None:
    # A fresh Mimi's codebooks are all zero, which maps every frame to code 0. Initialise them the way
    # vector quantisers are initialised from data: each stage's entries are drawn from the residuals of
    # varied synthetic audio (tones, noise, silence), so that different audio gets different codes.
    # Random draws come from a CPU generator (the same codebooks on any device); tensors then move to
    # the codec's device.
    gen = torch.Generator().manual_seed(seed)
    device = next(mimi.parameters()).device
    t = torch.arange(FRAME_SAMPLES * 4) / SAMPLE_RATE
    clips = [torch.zeros_like(t)]
    for i in range(63):
        freq = 80.0 * (1.07 ** i)
        amp = 0.02 + 0.5 * torch.rand(1, generator=gen).item()
        tone = amp * torch.sin(2 * torch.pi * freq * t)
        clips.append(tone + 0.05 * torch.rand(1, generator=gen).item() * torch.randn(t.shape, generator=gen))
    audio = torch.stack(clips).unsqueeze(1).to(device)
    with torch.no_grad():
        latent = mimi._encode_to_unquantized_latent(audio)
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            residual = rvq.input_proj(latent)
            for layer in rvq.vq.layers:
                codebook = layer._codebook
                vectors = residual.transpose(1, 2).reshape(-1, residual.shape[1])
                pick = torch.randint(0, vectors.shape[0], (codebook.embedding_sum.shape[0],), generator=gen)
                noise = torch.randn(codebook.embedding_sum.shape, generator=gen).to(device)
                jitter = 0.01 * vectors.std() * noise
                pick = pick.to(device)
                codebook.embedding_sum.copy_(vectors[pick] + jitter)
                codebook.cluster_usage.fill_(1.0)
                codebook._initialized.fill_(1.0)
                codebook._embedding = None
                residual = residual - layer.decode(layer.encode(residual))


# --------------------------------------------------------------------------- PersonaPlex

PERSONAPLEX_LM_KWARGS: dict[str, Any] = moshi_loaders._lm_kwargs | {"dep_q": 16}
PERSONAPLEX_DTYPE = torch.bfloat16  # PersonaPlex's loader casts everything to bf16; fp32 7B does not fit 24 GB


def build_personaplex_lm(lm_kwargs: dict[str, Any] | None, device: str | torch.device) -> LMModel:
    """PersonaPlex-7B's language model, unloaded: moshi's 7B layout with 16 depth steps, in bf16.

    The one place that builds the architecture: ``load_personaplex`` builds it on ``meta`` and loads
    the checkpoint into it; ``load_personaplex_random`` builds it on the device with moshi's default
    (seeded) initialisation. ``lm_kwargs`` defaults to PersonaPlex-7B's shapes.
    """
    with torch.device(device):
        lm = LMModel(device=device, dtype=PERSONAPLEX_DTYPE, **dict(lm_kwargs or PERSONAPLEX_LM_KWARGS))
    return lm.eval()


def build_personaplex_mimi(mimi_config: dict[str, Any] | None, device: str | torch.device = "cpu") -> MimiModel:
    """PersonaPlex's Mimi codec (moshi's, 8 codebooks, fp32), unloaded; ``mimi_config`` defaults to
    the real one."""
    return moshi_loaders.get_mimi(None, mimi_config, device=device, num_codebooks=AGENT_CODEBOOKS)


def _check_vocabulary(tokenizer: sentencepiece.SentencePieceProcessor, lm_kwargs: dict[str, Any], where: str) -> None:
    if tokenizer.vocab_size() > lm_kwargs["text_card"]:
        raise CheckpointError(
            f"{where}: vocabulary of {tokenizer.vocab_size()} pieces, expected at most {lm_kwargs['text_card']}"
        )


def _personaplex_bundle(
    lm: LMModel,
    mimi: MimiModel,
    tokenizer: sentencepiece.SentencePieceProcessor,
    device: torch.device,
    voices: dict[str, Path | torch.Tensor],
) -> ModelBundle:
    silence = torch.tensor(PERSONAPLEX_SILENCE_CODES) if mimi.cardinality == 2048 else None
    sine = torch.tensor(PERSONAPLEX_SINE_CODES) if mimi.cardinality == 2048 else None
    return _finish_bundle("personaplex", lm, mimi, tokenizer, device, silence, sine, voices)


def load_personaplex_random(
    seed: int = 1234,
    device: str | torch.device | None = None,
    *,
    lm_kwargs: dict[str, Any] | None = None,
    mimi_config: dict[str, Any] | None = None,
) -> ModelBundle:
    """PersonaPlex-7B's exact architecture (``build_personaplex_lm``, the real-size Mimi) with seeded
    random weights, for speed benchmarks only (``personagate bench worker --random-weights``): a step
    costs the same whatever the weights hold, but what this model says and sounds like is noise.

    The text tokenizer is a stand-in (the tiny model's, trained in-process; PersonaPlex's 32k
    SentencePiece model is part of the checkpoint) and the voices are the tiny model's clips, primed
    through Mimi like any voice clip. Never served: ``LOADERS`` does not offer it.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.monotonic()
    tokenizer = train_tiny_tokenizer()
    lm_kwargs = dict(lm_kwargs or PERSONAPLEX_LM_KWARGS)
    _check_vocabulary(tokenizer, lm_kwargs, "stand-in tokenizer")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        lm = build_personaplex_lm(lm_kwargs, device)
        mimi = build_personaplex_mimi(mimi_config, device)
        _randomise_codebooks(mimi, seed)
    bundle = _personaplex_bundle(lm, mimi, tokenizer, device, dict(tiny_voice_presets()))
    bundle.random_weights = True
    log.info("PersonaPlex architecture built with random weights (speed benchmarks only)",
             extra={"device": str(device), "seconds": round(time.monotonic() - started, 1)})
    return bundle


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
    _check_vocabulary(tokenizer, lm_kwargs, str(tok_path))
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
    bundle = _personaplex_bundle(lm, mimi, tokenizer, device, voices)
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


def _finish_bundle(
    name: str,
    lm: LMModel,
    mimi: MimiModel,
    tokenizer: sentencepiece.SentencePieceProcessor,
    device: torch.device,
    silence: torch.Tensor | None,
    sine: torch.Tensor | None,
    voices: dict[str, Path | torch.Tensor],
) -> ModelBundle:
    # The file holds 16 depth steps (agent then user codebooks); generating only the agent's 8 gives
    # the same agent tokens as PersonaPlex's loop, one frame earlier and with half the depformer work.
    lm.dep_q = AGENT_CODEBOOKS
    lm.eval()
    mimi.eval()
    if silence is None or sine is None:
        silence = encode_frame_codes(mimi, torch.zeros(FRAME_SAMPLES))
        sine = encode_frame_codes(mimi, sine_frame())
    return ModelBundle(
        name=name,
        lm=lm,
        mimi=mimi,
        tokenizer=tokenizer,
        device=device,
        silence_codes=silence.to(device=device, dtype=torch.long),
        sine_codes=sine.to(device=device, dtype=torch.long),
        voices=voices,
        text_pad_id=lm.existing_text_padding_id,
        text_epad_id=lm.existing_text_end_padding_id,
    )


def sine_frame(frequency: float = 440.0) -> torch.Tensor:
    t = torch.arange(FRAME_SAMPLES, dtype=torch.float64) / SAMPLE_RATE
    return (0.5 * torch.sin(2 * torch.pi * frequency * t)).float()


@torch.no_grad()
def encode_frame_codes(mimi: MimiModel, frame: torch.Tensor) -> torch.Tensor:
    """Mimi codes [8] of one 80 ms frame, encoded on its own (outside any stream)."""
    param = next(mimi.parameters())
    codes = mimi.encode(frame.view(1, 1, -1).to(param))
    return codes[0, :, 0]


# What a worker may serve. ``load_personaplex_random`` is deliberately not here: benchmarks only.
LOADERS: dict[str, Callable[..., ModelBundle]] = {"tiny": load_tiny, "personaplex": load_personaplex}
