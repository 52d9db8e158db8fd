"""The tiny model: real moshi modules at small dimensions with seeded random weights, built in-process.

For tests and CPU machines: it runs every code path PersonaPlex runs (``LMModel`` + ``MimiModel`` +
``LMGen``, PersonaPlex's 16-step depth layout and delays) with no checkpoint and no GPU. What it says
is noise; ``load_tiny(seed)`` gives the same weights for the same seed.
"""

from __future__ import annotations

import io
from typing import Any

import sentencepiece
import torch
from moshi.models import MimiModel
from moshi.models import loaders as moshi_loaders

from personagate_common.protocol import FRAME_RATE, FRAME_SAMPLES, SAMPLE_RATE
from personagate_common.voices import PRESET_VOICES

from .bundle import AGENT_CODEBOOKS, ModelBundle, finish_bundle

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
    """The tiny model's SentencePiece tokenizer, trained on ``_TINY_CORPUS`` (moshi's pad ids 0 and 3)."""
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
        randomise_codebooks(mimi, seed)
    bundle = finish_bundle(
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


def randomise_codebooks(mimi: MimiModel, seed: int) -> None:
    """Give a freshly built Mimi seeded codebooks that tell different audio apart (in place)."""
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
