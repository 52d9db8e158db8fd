"""Loading a PersonaPlex checkpoint folder (nvidia/personaplex-7b-v1 layout) and its `.pt` voices.

The real checkpoint is 16.7 GB and gated, so these tests write a small checkpoint in the same layout
(same file names, same tensor names, the tiny model's shapes) and load it through the same code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from agent_runtime.batch import SlotBatch
from agent_runtime.model import (
    TINY_MIMI_CONFIG,
    CheckpointError,
    ModelBundle,
    load_personaplex,
    load_tiny,
    tiny_lm_kwargs,
)
from agent_runtime.persona import Persona, VoicePrompt, load_voice, prompt_tokens
from agent_runtime.priming import Primer, delay_frames, plan_priming, prompt_frames

GREEDY = {"use_sampling": False}
MODEL = "model.safetensors"
MIMI = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER = "tokenizer_spm_32k_3.model"


def export_personaplex_voice(bundle: ModelBundle, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """What PersonaPlex's ``_step_voice_prompt_core`` saves for a voice of V frames: the LM's input
    embeddings for positions 0..V-2 (``[V-1, 1, 1, dim]``) and its 4-column token ring, position p at
    index p % 4, holding position V-1 in full and the delayed codebooks of position V."""
    lm = bundle.lm
    v = codes.shape[1]
    frames = prompt_frames(bundle, codes, [])[:, :v]
    columns = delay_frames(lm, frames, first_position=0)
    with torch.no_grad():
        embeddings = []
        for c in range(v - 1):
            col = columns[:, c].view(1, -1, 1)
            summed = None
            for k in range(lm.num_audio_codebooks):  # moshi's LMModel.forward_text order
                emb = lm.emb[k](col[:, k + 1])
                summed = emb if summed is None else summed + emb
            summed = summed + lm.text_emb(col[:, 0])
            embeddings.append(summed)
    ring = torch.full((1, lm.num_codebooks, 4), -2, dtype=torch.long)
    ring[0, :, (v - 1) % 4] = columns[:, v - 1]
    for k, delay in enumerate(lm.delays):
        if delay:
            ring[0, k, v % 4] = frames[k, v - 1]
    return {"embeddings": torch.stack(embeddings), "cache": ring}


def _voice_codes(bundle: ModelBundle, primer: Primer) -> torch.Tensor:
    voice = load_voice(bundle, Persona(prompt="", voice="tiny-low"), primer.mimi)
    return voice.codes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tiny = load_tiny()
    folder = tmp_path_factory.mktemp("personaplex-7b-v1")
    save_file({k: v.contiguous() for k, v in tiny.lm.state_dict().items()}, str(folder / MODEL))
    save_file({k: v.contiguous() for k, v in tiny.mimi.state_dict().items()}, str(folder / MIMI))
    (folder / TOKENIZER).write_bytes(tiny.tokenizer.serialized_model_proto())
    (folder / "voices").mkdir()
    codes = _voice_codes(tiny, Primer(tiny, GREEDY))
    torch.save(export_personaplex_voice(tiny, codes), folder / "voices" / "TINYF0.pt")
    return folder


def _load(folder: Path) -> ModelBundle:
    return load_personaplex(
        folder, "cpu", lm_kwargs=tiny_lm_kwargs(load_tiny().tokenizer.vocab_size()),
        mimi_config=TINY_MIMI_CONFIG, progress=False,
    )


def test_checkpoint_folder_loads_and_serves_a_call(checkpoint):
    """An operator pointing --weights at a checkpoint folder gets a working model: weights as in the
    file (bf16), 16 depth steps loaded and 8 generated, the voices listed, a call primed and stepped."""
    bundle = _load(checkpoint)
    tiny = load_tiny()
    assert bundle.dtype == torch.bfloat16
    assert bundle.lm.dep_q == 8 and len(bundle.lm.depformer_in) == 16
    assert torch.equal(bundle.lm.text_emb.weight, tiny.lm.text_emb.weight.to(torch.bfloat16))
    assert sorted(bundle.voices) == ["TINYF0"]
    primer = Primer(bundle, GREEDY)
    persona = Persona(prompt="Thank you for calling.", voice="TINYF0")
    primed = primer.prime(plan_priming(bundle, load_voice(bundle, persona, primer.mimi),
                                       prompt_tokens(bundle, persona.prompt)), "h")
    batch = SlotBatch(bundle, 2, GREEDY)
    try:
        batch.install(1, primed)
        out = batch.step_codes(torch.zeros(2, 8, dtype=torch.long), torch.tensor([False, True]))
    finally:
        batch.close()
    assert ((out[1, 1:] >= 0) & (out[1, 1:] < bundle.lm.card)).all()


@pytest.mark.parametrize("name, expected", [
    (MODEL, "language model"), (MIMI, "Mimi"), (TOKENIZER, "SentencePiece"),
])
def test_a_missing_file_is_named(checkpoint, tmp_path, name, expected):
    """A missing checkpoint file is reported by name, with what was expected there."""
    for item in checkpoint.iterdir():
        if item.name != name:
            (tmp_path / item.name).symlink_to(item)
    with pytest.raises(CheckpointError, match=rf"{name}: missing; expected .*{expected}"):
        _load(tmp_path)


def test_a_corrupt_weights_file_is_named(checkpoint, tmp_path):
    """A truncated download gives a message naming the file, not a stack trace from safetensors."""
    for item in checkpoint.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / MODEL).unlink()
    (tmp_path / MODEL).write_bytes((checkpoint / MODEL).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{MODEL}: unreadable safetensors file"):
        _load(tmp_path)


def test_weights_of_another_architecture_are_named(checkpoint, tmp_path):
    """Weights of the wrong model are refused with the offending tensor and both shapes."""
    for item in checkpoint.iterdir():
        (tmp_path / item.name).symlink_to(item)
    tiny = load_tiny()
    state = {k: v.contiguous() for k, v in tiny.lm.state_dict().items()}
    state["text_emb.weight"] = torch.zeros(7, 3)
    (tmp_path / MODEL).unlink()
    save_file(state, str(tmp_path / MODEL))
    with pytest.raises(CheckpointError, match=r"text_emb\.weight has shape \(7, 3\), expected"):
        _load(tmp_path)
    del state["text_emb.weight"]
    (tmp_path / MODEL).unlink()
    save_file(state, str(tmp_path / MODEL))
    with pytest.raises(CheckpointError, match=r"1 missing tensors"):
        _load(tmp_path)


def test_a_folder_that_does_not_exist(tmp_path):
    """A mistyped --weights path says so and what the folder should hold."""
    with pytest.raises(CheckpointError, match="not a folder; expected a local copy of nvidia/personaplex-7b-v1"):
        _load(tmp_path / "nope")


def test_pt_voice_primes_like_the_clip_it_was_made_from():
    """A PersonaPlex `.pt` voice (stored embeddings + token ring) primes a call to the same state, and
    the same conversation, as the audio codes it was made from: the `.pt` layout is read right."""
    bundle = load_tiny()
    primer = Primer(bundle, GREEDY)
    codes = _voice_codes(bundle, primer)
    saved = export_personaplex_voice(bundle, codes)
    from_pt = VoicePrompt(embeddings=saved["embeddings"].reshape(-1, bundle.lm.dim), ring=saved["cache"][0])
    tokens = prompt_tokens(bundle, "You are a claims agent.")
    a = primer.prime(plan_priming(bundle, VoicePrompt(codes=codes), tokens), "a")
    b = primer.prime(plan_priming(bundle, from_pt, tokens), "b")
    assert a.position == b.position
    assert torch.equal(a.ring, b.ring)
    for ka, kb in zip(a.kv, b.kv, strict=True):
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
    batch = SlotBatch(bundle, 2, GREEDY)
    try:
        batch.install(0, a)
        batch.install(1, b)
        gen = torch.Generator().manual_seed(3)
        for _ in range(10):
            user = torch.randint(0, bundle.lm.card, (1, 8), generator=gen).repeat(2, 1)
            out = batch.step_codes(user, torch.tensor([True, True]))
            assert torch.equal(out[0], out[1])
    finally:
        batch.close()


def test_a_damaged_pt_voice_is_refused_with_its_path(tmp_path):
    """A `.pt` voice that is not a PersonaPlex voice for this model is refused with a clear reason."""
    from agent_runtime.persona import PersonaError, voice_from_pt

    bundle = load_tiny()
    bad = tmp_path / "bad.pt"
    torch.save({"embeddings": torch.zeros(5, 1, 1, 7), "cache": torch.zeros(1, 17, 4)}, bad)
    with pytest.raises(PersonaError, match=r"bad\.pt: embeddings have shape \(5, 1, 1, 7\), expected"):
        voice_from_pt(bundle, bad)
    bad.write_bytes(b"not a torch file")
    with pytest.raises(PersonaError, match="not a readable PersonaPlex voice file"):
        voice_from_pt(bundle, bad)


def test_the_personaplex_architecture_matches_the_published_checkpoint():
    """The shapes the loader builds for --model personaplex are PersonaPlex-7B's: 8.37 B parameters,
    16.7 GB in bf16, 16 depth steps in the file (third-party model cards; built on the meta device,
    so no memory is used)."""
    from moshi.models import LMModel

    from agent_runtime.model import PERSONAPLEX_LM_KWARGS

    with torch.device("meta"):
        lm = LMModel(device="meta", dtype=torch.bfloat16, **PERSONAPLEX_LM_KWARGS)
    params = sum(p.numel() for p in lm.parameters())
    assert 8.36e9 < params < 8.38e9
    assert round(params * 2 / 1e9, 1) == 16.7
    assert len(lm.depformer_in) == 16 and lm.num_codebooks == 17 and lm.context == 3000


def test_a_corrupt_tokenizer_is_named(checkpoint, tmp_path):
    """A damaged tokenizer file is reported by name, as a SentencePiece model that could not be read."""
    for item in checkpoint.iterdir():
        if item.name != TOKENIZER:
            (tmp_path / item.name).symlink_to(item)
    (tmp_path / TOKENIZER).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=rf"{TOKENIZER}: not a SentencePiece model"):
        _load(tmp_path)
