"""The PersonaPlex checkpoint loader, run on a small checkpoint written in the real folder layout.

The published ``nvidia/personaplex-7b-v1`` checkpoint is 16.7 GB and gated, so these tests write the
tiny model's weights under the real file names (``model.safetensors``, the Mimi file, the
SentencePiece model, ``voices/*.pt``) and load them through ``load_personaplex`` with small shapes.
The safetensors files use the tensor names PersonaPlex's files have: PersonaPlex is moshi 0.1.0,
whose attention layers store one fused ``self_attn.in_proj_weight`` / ``out_proj.weight`` (all depth
steps stacked) where this moshi has ``in_projs.{i}.weight`` / ``out_projs.{i}.weight``.

The ``.pt`` voice helper below mirrors NVIDIA/personaplex ``moshi/models/lm.py`` (commit 3428dfd):
``LMGen.prepare_step_input`` (how each voice frame is written into the 4-column token ring),
``LMModel.embed_codes`` (the saved input embeddings) and ``_step_voice_prompt_core`` (what is saved).
It is written from that code, not from ``agent_runtime.priming``, so the equivalence test below
checks the worker's reading of the format against PersonaPlex's writing of it. (Checked once by
running that PersonaPlex code itself on these tiny weights: its saved ``.pt`` equalled this helper's
output exactly, and its conversation after priming matched the worker's, one 80 ms call later.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from agent_runtime.batch import SlotBatch
from agent_runtime.config import Sampling
from agent_runtime.model import SAMPLE_RATE, CheckpointError, ModelBundle, load_personaplex, load_tiny
from agent_runtime.model.tiny import TINY_MIMI_CONFIG, tiny_lm_kwargs, tiny_voice_presets
from agent_runtime.priming import PrimedState, Primer, delay_frames, plan_priming, prompt_frames
from agent_runtime.voice_prompt import VoicePrompt, load_voice, prompt_tokens, voice_from_pt
from personagate_common.persona import Persona
from personagate_common.voices import PRESET_VOICES

GREEDY = {"use_sampling": False}
MODEL_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
PROMPT = "You are a claims agent at Harbor Mutual Insurance."


# --------------------------------------------------------------------------- tiny model voices


def test_the_tiny_model_speaks_with_personaplex_voice_names():
    """A persona naming a PersonaPlex preset (NATF0 ... VARM4) runs on the tiny model: every name is
    there, each is its own voice (its own pitch), the female ones higher than the male ones, and each
    is a 3 s clip like tiny-low, so that warming a worker up with the first of them stays cheap."""
    presets = tiny_voice_presets()
    assert set(PRESET_VOICES) | {"tiny-low", "tiny-high"} == set(presets)
    assert min(presets) in PRESET_VOICES  # what the worker warms up with

    def pitch(clip: torch.Tensor) -> float:
        spectrum = torch.fft.rfft(clip).abs()
        return float(spectrum.argmax()) * SAMPLE_RATE / len(clip)

    pitches = {name: pitch(presets[name]) for name in PRESET_VOICES}
    assert len({round(p) for p in pitches.values()}) == len(PRESET_VOICES)
    female = [p for name, p in pitches.items() if name[3] == "F"]
    male = [p for name, p in pitches.items() if name[3] == "M"]
    assert min(female) > max(male)
    assert all(presets[name].shape == presets["tiny-low"].shape for name in PRESET_VOICES)


# --------------------------------------------------------------------------- PersonaPlex file layout


def personaplex_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A moshi 0.2 state dict under moshi 0.1.0's tensor names, as PersonaPlex's files hold them:
    each attention's per-step ``in_projs.{i}`` / ``out_projs.{i}`` stacked into one fused tensor."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*\.self_attn\.)(in|out)_projs\.(\d+)\.weight", key)
        if m is None:
            out[key] = value.contiguous()
        else:
            name = m[1] + ("in_proj_weight" if m[2] == "in" else "out_proj.weight")
            fused.setdefault(name, {})[int(m[3])] = value
    for name, steps in fused.items():
        out[name] = torch.cat([steps[i] for i in range(len(steps))]).contiguous()
    return out


# --------------------------------------------------------------------------- PersonaPlex .pt export


def _embed_codes(bundle: ModelBundle, column: torch.Tensor) -> torch.Tensor:
    """PersonaPlex ``LMModel.embed_codes`` (= the input half of moshi's ``forward_text``) of one
    ring column [1, K, 1]: the audio codebook embeddings summed in order, then the text embedding."""
    lm = bundle.lm
    summed = None
    for cb in range(lm.num_audio_codebooks):
        emb = lm.emb[cb](column[:, cb + 1])
        summed = emb if summed is None else summed + emb
    return summed + lm.text_emb(column[:, 0])


@torch.no_grad()
def export_personaplex_voice(bundle: ModelBundle, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """What PersonaPlex's ``_step_voice_prompt_core`` saves after stepping voice frames ``codes`` [8, V].

    Each voice step writes text PAD, the agent codes and the sine user codes into the token ring at
    ``offset + delay`` (``prepare_step_input``); positions ``offset <= delay`` are overwritten with the
    initial token, and the first call only initialises column 0. Every later call embeds the ring
    column ``offset - 1`` (``return_embeddings``). Saved: those V-1 embeddings ``[V-1, 1, 1, dim]`` and
    the ring ``[1, 17, 4]`` as it stands after the last voice step: position p at index p % 4, the last
    voice position V-1 complete, position V holding only the delayed codebooks of frame V-1 (its other
    rows still hold whatever was written 4 positions earlier, or -2 if nothing was).
    """
    lm = bundle.lm
    ring_len = max(lm.delays) + 3
    initial = lm._get_initial_token()[0, :, 0].cpu()
    pad = torch.tensor([bundle.text_pad_id])
    sine = bundle.sine_codes.cpu()
    ring = torch.full((1, lm.num_codebooks, ring_len), -2, dtype=torch.long)  # ungenerated_token_id
    embeddings = []
    for offset in range(codes.shape[1]):
        frame = torch.cat([pad, codes[:, offset].cpu(), sine])  # text | agent 8 | user 8
        for k, delay in enumerate(lm.delays):
            ring[0, k, (offset + delay) % ring_len] = frame[k]
        for k, delay in enumerate(lm.delays):
            if offset <= delay:
                ring[0, k, offset % ring_len] = initial[k]
        if offset == 0:
            ring[0, :, 0] = initial
            continue
        col = (offset - 1) % ring_len
        embeddings.append(_embed_codes(bundle, ring[:, :, col : col + 1].to(bundle.device)))
    return {"embeddings": torch.stack(embeddings, dim=0).cpu(), "cache": ring}


def _pt_voice(bundle: ModelBundle, codes: torch.Tensor) -> VoicePrompt:
    saved = export_personaplex_voice(bundle, codes)
    return VoicePrompt(embeddings=saved["embeddings"].reshape(-1, bundle.lm.dim), ring=saved["cache"][0])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny() -> ModelBundle:
    return load_tiny()


@pytest.fixture(scope="module")
def voice_codes(tiny) -> torch.Tensor:
    """Mimi codes [8, 38] of the tiny model's 3 s "tiny-low" clip."""
    voice = load_voice(tiny, Persona(prompt="", voice="tiny-low"), tiny.mimi_sharing_weights())
    assert voice.codes is not None
    return voice.codes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny, voice_codes) -> Path:
    """A folder in the nvidia/personaplex-7b-v1 layout holding the tiny model's weights."""
    folder = tmp_path_factory.mktemp("personaplex-7b-v1")
    save_file(personaplex_layout(tiny.lm.state_dict()), str(folder / MODEL_FILE))
    save_file(personaplex_layout(tiny.mimi.state_dict()), str(folder / MIMI_FILE))
    (folder / TOKENIZER_FILE).write_bytes(tiny.tokenizer.serialized_model_proto())
    (folder / "voices").mkdir()
    torch.save(export_personaplex_voice(tiny, voice_codes), folder / "voices" / "TINYF0.pt")
    return folder


def _load(folder: Path, tiny: ModelBundle) -> ModelBundle:
    return load_personaplex(
        folder, "cpu", lm_kwargs=tiny_lm_kwargs(tiny.tokenizer.vocab_size()),
        mimi_config=TINY_MIMI_CONFIG, progress=False,
    )


@pytest.fixture(scope="module")
def loaded(checkpoint, tiny) -> ModelBundle:
    return _load(checkpoint, tiny)


def _copy_without(checkpoint: Path, dest: Path, *skip: str) -> Path:
    """A copy of the checkpoint folder (files as symlinks) without the files named in ``skip``."""
    for item in checkpoint.iterdir():
        if item.name not in skip:
            (dest / item.name).symlink_to(item, target_is_directory=item.is_dir())
    return dest


def _prime(bundle: ModelBundle, voice: VoicePrompt, prompt: str = PROMPT, primer: Primer | None = None) -> PrimedState:
    primer = primer or Primer(bundle, GREEDY)
    return primer.prime(plan_priming(bundle, voice, prompt_tokens(bundle, prompt)), "h")


# --------------------------------------------------------------------------- loading


def test_checkpoint_weights_load_as_bf16_copies_of_the_file(loaded, tiny):
    """`--model personaplex --weights DIR` runs exactly the weights in the folder: every LM tensor
    equals the file's (cast to bf16, as PersonaPlex's loader does), the Mimi codec is the file's, and
    nothing is left on the meta device it was built on."""
    assert loaded.name == "personaplex"
    assert loaded.dtype == torch.bfloat16
    want = tiny.lm.state_dict()
    got = loaded.lm.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        expected = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert got[key].dtype == expected.dtype, key
        assert torch.equal(got[key], expected), key
    for key, value in tiny.mimi.state_dict().items():
        assert torch.equal(loaded.mimi.state_dict()[key], value), key
    tensors = [*loaded.lm.parameters(), *loaded.lm.buffers(), *loaded.mimi.parameters(), *loaded.mimi.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)
    # the codec really is the file's: it encodes the priming frames to the same codes
    assert torch.equal(loaded.sine_codes, tiny.sine_codes)
    assert torch.equal(loaded.silence_codes, tiny.silence_codes)


def test_sixteen_depth_steps_are_loaded_and_eight_generated(loaded):
    """The file holds PersonaPlex's 16 depformer steps (agent then user codebooks); the worker only
    generates the agent's 8, and so reads the user's 8 from the caller's audio."""
    assert len(loaded.lm.depformer_in) == 16 and loaded.lm.n_q == 16
    assert loaded.lm.dep_q == 8
    assert loaded.lm.num_codebooks == 17


def test_tokenizer_and_voices_come_from_the_folder(loaded, tiny):
    """The text tokenizer is the folder's SentencePiece model and `voices/*.pt` are the presets."""
    assert loaded.tokenizer.serialized_model_proto() == tiny.tokenizer.serialized_model_proto()
    assert list(loaded.voices) == ["TINYF0"]
    assert Path(loaded.voices["TINYF0"]).name == "TINYF0.pt"
    assert (loaded.text_pad_id, loaded.text_epad_id) == (3, 0)


@pytest.mark.slow  # seconds of the tiny model on CPU
def test_a_checkpoint_voice_primes_a_call_that_produces_agent_audio(loaded):
    """A persona naming a checkpoint voice primes (bf16) and its call produces agent codes the codec
    can decode: one text token and 8 agent codes in [0, card) per step."""
    primer = Primer(loaded, GREEDY)
    persona = Persona(prompt=PROMPT, voice="TINYF0")
    voice = load_voice(loaded, persona, primer.mimi)
    assert voice.embeddings is not None and voice.frames == 38
    primed = primer.prime(plan_priming(loaded, voice, prompt_tokens(loaded, persona.prompt)), persona.content_hash())
    assert primed.position == 38 + 6 + len(prompt_tokens(loaded, PROMPT)) + 6
    assert all(kv.dtype == torch.bfloat16 for kv in primed.kv)
    batch = SlotBatch(loaded, 2, Sampling(greedy=True))
    try:
        batch.install(1, primed)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            user = torch.randint(0, loaded.lm.card, (2, 8), generator=gen)
            out = batch.step_codes(user, torch.tensor([False, True]))
            assert tuple(out.shape) == (2, 9)
            assert ((out[1, 1:] >= 0) & (out[1, 1:] < loaded.lm.card)).all()
            assert 0 <= int(out[1, 0]) < loaded.lm.text_card
            assert (out[0] == -2).all()  # the idle slot generated nothing
    finally:
        batch.close()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name, what", [
    (MODEL_FILE, "the PersonaPlex language model weights"),
    (MIMI_FILE, "the Mimi audio codec weights"),
    (TOKENIZER_FILE, "the SentencePiece text tokenizer"),
])
def test_each_missing_file_is_named_with_what_belongs_there(checkpoint, tiny, tmp_path, name, what):
    """An incomplete download names the missing file and what it should have been."""
    folder = _copy_without(checkpoint, tmp_path, name)
    with pytest.raises(CheckpointError) as err:
        _load(folder, tiny)
    assert f"{folder / name}: missing; expected {what}" in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_weights_file_is_named(checkpoint, tiny, tmp_path, damage):
    """A truncated or corrupt model.safetensors is refused with its path, not a safetensors trace."""
    folder = _copy_without(checkpoint, tmp_path, MODEL_FILE)
    data = (checkpoint / MODEL_FILE).read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"\x13\x37" * 5000, "empty": b""}[damage]
    (folder / MODEL_FILE).write_bytes(damaged)
    with pytest.raises(CheckpointError) as err:
        _load(folder, tiny)
    message = str(err.value)
    assert str(folder / MODEL_FILE) in message
    assert "unreadable safetensors file" in message and "language model" in message


def test_a_damaged_mimi_file_is_named(checkpoint, tiny, tmp_path):
    """A corrupt codec file is refused with its own path."""
    folder = _copy_without(checkpoint, tmp_path, MIMI_FILE)
    (folder / MIMI_FILE).write_bytes((checkpoint / MIMI_FILE).read_bytes()[:500])
    with pytest.raises(CheckpointError, match=rf"{MIMI_FILE}: unreadable safetensors file.*Mimi codec"):
        _load(folder, tiny)


def _write_lm(folder: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / MODEL_FILE))


def test_the_checkpoint_files_use_personaplex_tensor_names(checkpoint):
    """The fixture really is in PersonaPlex's (moshi 0.1.0) naming, so the loader is tested on it."""
    from safetensors import safe_open

    for name in (MODEL_FILE, MIMI_FILE):
        with safe_open(str(checkpoint / name), framework="pt") as f:
            keys = set(f.keys())
        assert any(k.endswith("self_attn.in_proj_weight") for k in keys), name
        assert not any(".in_projs." in k for k in keys), name


@pytest.mark.slow  # seconds of the tiny model on CPU
def test_weights_saved_with_current_moshi_names_load_too(checkpoint, tiny, tmp_path):
    """A checkpoint re-saved by moshi 0.2 (per-step attention tensors) loads to the same weights."""
    folder = _copy_without(checkpoint, tmp_path, MODEL_FILE, MIMI_FILE)
    _write_lm(folder, tiny.lm.state_dict())
    save_file({k: v.contiguous() for k, v in tiny.mimi.state_dict().items()}, str(folder / MIMI_FILE))
    bundle = _load(folder, tiny)
    for key, value in tiny.lm.state_dict().items():
        assert torch.equal(bundle.lm.state_dict()[key], value.to(torch.bfloat16)), key
    assert torch.equal(bundle.sine_codes, tiny.sine_codes)


def test_a_tensor_of_the_wrong_shape_is_named(checkpoint, tiny, tmp_path):
    """Weights of another architecture are refused with the tensor, its shape and the expected one."""
    folder = _copy_without(checkpoint, tmp_path, MODEL_FILE)
    state = personaplex_layout(tiny.lm.state_dict())
    key = "transformer.layers.1.gating.linear_out.weight"
    want = tuple(state[key].shape)
    state[key] = torch.zeros(want[0], want[1] + 1)
    _write_lm(folder, state)
    with pytest.raises(CheckpointError) as err:
        _load(folder, tiny)
    message = str(err.value)
    assert f"tensor {key} has shape {(want[0], want[1] + 1)}, expected {want}" in message
    assert str(folder / MODEL_FILE) in message


def test_a_missing_or_extra_tensor_is_named(checkpoint, tiny, tmp_path):
    """A file lacking a tensor (e.g. a dep_q=8 Moshi file with no depth steps 8-15) names it; so
    does a file with a tensor the architecture does not have."""
    folder = _copy_without(checkpoint, tmp_path, MODEL_FILE)
    state = personaplex_layout(tiny.lm.state_dict())
    del state["depformer_in.15.weight"]
    _write_lm(folder, state)
    with pytest.raises(CheckpointError, match=r"1 missing tensors \(e\.g\. \['depformer_in\.15\.weight'\]\)"):
        _load(folder, tiny)
    state = personaplex_layout(tiny.lm.state_dict()) | {"lora.extra": torch.zeros(2)}
    _write_lm(folder, state)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e\.g\. \['lora\.extra'\]\)"):
        _load(folder, tiny)


def test_fused_attention_weights_of_another_depth_are_named(checkpoint, tiny, tmp_path):
    """A fused depformer attention tensor with the depth steps of another model (8 instead of 16, or
    a size that does not split at all) is refused with the tensor named, not loaded misaligned."""
    folder = _copy_without(checkpoint, tmp_path, MODEL_FILE)
    state = personaplex_layout(tiny.lm.state_dict())
    key = "depformer.layers.0.self_attn.in_proj_weight"
    steps16 = state[key]
    state[key] = steps16[: steps16.shape[0] // 2]  # the 8 depth steps of a Moshi checkpoint
    _write_lm(folder, state)
    with pytest.raises(CheckpointError, match=r"tensor depformer\.layers\.0\.self_attn\.in_projs\.0\.weight has shape"):
        _load(folder, tiny)
    state[key] = steps16[:17]
    _write_lm(folder, state)
    with pytest.raises(CheckpointError) as err:
        _load(folder, tiny)
    assert "does not match the language model architecture" in str(err.value)
    assert "depformer.layers.0.self_attn." in str(err.value)


def test_a_weights_folder_that_does_not_exist(tmp_path, tiny):
    """A mistyped --weights path is refused with what the folder should contain."""
    with pytest.raises(CheckpointError) as err:
        _load(tmp_path / "personaplex-7b-v2", tiny)
    message = str(err.value)
    assert "personaplex-7b-v2: not a folder" in message
    assert "nvidia/personaplex-7b-v1" in message and MODEL_FILE in message


def test_a_file_given_as_weights_folder_is_refused(checkpoint, tiny):
    """Pointing --weights at model.safetensors itself instead of its folder is refused."""
    with pytest.raises(CheckpointError, match="not a folder"):
        _load(checkpoint / MODEL_FILE, tiny)


def test_a_checkpoint_without_voices_still_loads(checkpoint, tiny, tmp_path):
    """Without `voices/` (voices.tgz not unpacked) the model loads with no presets; calls must then
    bring a voice clip."""
    folder = _copy_without(checkpoint, tmp_path, "voices")
    assert _load(folder, tiny).voices == {}


# --------------------------------------------------------------------------- the .pt voice format


def test_exported_voice_has_personaplex_shapes(tiny, voice_codes):
    """The helper writes what PersonaPlex writes: [V-1, 1, 1, dim] embeddings, a [1, 17, 4] int64 ring,
    and the worker's reader accepts it as a V-frame voice."""
    saved = export_personaplex_voice(tiny, voice_codes)
    v = voice_codes.shape[1]
    assert tuple(saved["embeddings"].shape) == (v - 1, 1, 1, tiny.lm.dim)
    assert tuple(saved["cache"].shape) == (1, 17, 4) and saved["cache"].dtype == torch.long
    # position V-1 complete (PAD, last voice frame's codebook 0 and sine codebook 0, frame V-2 delayed)
    col = saved["cache"][0, :, (v - 1) % 4]
    assert col[0] == 3 and col[1] == voice_codes[0, v - 1] and torch.equal(col[2:9], voice_codes[1:, v - 2])
    # the saved embeddings are the worker's own delayed layout, embedded
    columns = delay_frames(tiny.lm, prompt_frames(tiny, voice_codes, [])[:, :v], first_position=0)
    with torch.no_grad():
        again = _embed_codes(tiny, columns[None, :, : v - 1])
    torch.testing.assert_close(saved["embeddings"][:, 0, 0], again[0], rtol=0, atol=0)


def test_a_pt_voice_file_reads_back(tiny, voice_codes, tmp_path):
    """A `.pt` voice on disk loads as V-1 embeddings plus the ring, whatever its float dtype."""
    path = tmp_path / "NATF9.pt"
    saved = export_personaplex_voice(tiny, voice_codes)
    torch.save({"embeddings": saved["embeddings"].to(torch.bfloat16), "cache": saved["cache"]}, path)
    voice = voice_from_pt(tiny, path)
    assert voice.frames == voice_codes.shape[1]
    assert tuple(voice.embeddings.shape) == (voice_codes.shape[1] - 1, tiny.lm.dim)
    assert torch.equal(voice.ring, saved["cache"][0])


def _assert_same_call(bundle: ModelBundle, a: PrimedState, b: PrimedState, steps: int = 10) -> None:
    assert a.position == b.position
    assert torch.equal(a.ring, b.ring)
    assert len(a.kv) == len(b.kv)
    for ka, kb in zip(a.kv, b.kv, strict=True):
        assert ka.shape == kb.shape
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
    batch = SlotBatch(bundle, 2, Sampling(greedy=True))
    try:
        batch.install(0, a)
        batch.install(1, b)
        gen = torch.Generator().manual_seed(7)
        both = torch.tensor([True, True])
        for step in range(steps):
            user = torch.randint(0, bundle.lm.card, (1, 8), generator=gen).repeat(2, 1)
            out = batch.step_codes(user, both)
            assert (out[0, 1:] >= 0).all(), step
            assert torch.equal(out[0], out[1]), f"step {step}: {out[0].tolist()} != {out[1].tolist()}"
    finally:
        batch.close()


@pytest.mark.slow  # seconds of the tiny model on CPU
def test_pt_voice_primes_exactly_like_the_codes_it_was_made_from(tiny, voice_codes):
    """The `.pt` path follows PersonaPlex's layout: a persona primed from a PersonaPlex voice file
    reaches the same state (position, attention cache, token ring) and then holds the same call as
    one primed from the voice's audio codes."""
    primer = Primer(tiny, GREEDY)
    from_codes = _prime(tiny, VoicePrompt(codes=voice_codes), primer=primer)
    from_pt = _prime(tiny, _pt_voice(tiny, voice_codes), primer=primer)
    assert from_codes.position == voice_codes.shape[1] + 12 + len(prompt_tokens(tiny, PROMPT))
    _assert_same_call(tiny, from_codes, from_pt)


@pytest.mark.slow  # seconds of the tiny model on CPU
@pytest.mark.parametrize("frames", [2, 3, 4, 5])
def test_short_pt_voices_prime_like_their_codes(tiny, frames):
    """Very short voices, where PersonaPlex's initial tokens and its 4-column ring wrap-around meet,
    still prime exactly like their codes; with and without a text prompt."""
    codes = torch.randint(0, tiny.lm.card, (8, frames), generator=torch.Generator().manual_seed(frames))
    primer = Primer(tiny, GREEDY)
    for prompt in (PROMPT, ""):
        a = _prime(tiny, VoicePrompt(codes=codes), prompt, primer)
        b = _prime(tiny, _pt_voice(tiny, codes), prompt, primer)
        _assert_same_call(tiny, a, b, steps=3)


def test_a_damaged_tokenizer_is_named(checkpoint, tiny, tmp_path):
    """A corrupt tokenizer file is reported by name, as a SentencePiece model that could not be read."""
    folder = _copy_without(checkpoint, tmp_path, TOKENIZER_FILE)
    (folder / TOKENIZER_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=rf"{TOKENIZER_FILE}: not a SentencePiece model"):
        _load(folder, tiny)


def test_a_damaged_pt_voice_is_refused_with_its_path(tiny, tmp_path):
    """A `.pt` voice that is not a PersonaPlex voice for this model is refused with a clear reason."""
    from personagate_common.persona import PersonaError

    bad = tmp_path / "bad.pt"
    torch.save({"embeddings": torch.zeros(5, 1, 1, 7), "cache": torch.zeros(1, 17, 4)}, bad)
    with pytest.raises(PersonaError, match=r"bad\.pt: embeddings have shape \(5, 1, 1, 7\), expected"):
        voice_from_pt(tiny, bad)
    bad.write_bytes(b"not a torch file")
    with pytest.raises(PersonaError, match="not a readable PersonaPlex voice file"):
        voice_from_pt(tiny, bad)


def test_the_personaplex_architecture_matches_the_published_checkpoint():
    """The shapes the loader builds for --model personaplex are PersonaPlex-7B's: 8.37 B parameters,
    16.7 GB in bf16, 16 depth steps in the file (third-party model cards; built on the meta device,
    so no memory is used)."""
    from moshi.models import LMModel

    from agent_runtime.model.personaplex import PERSONAPLEX_LM_KWARGS

    with torch.device("meta"):
        lm = LMModel(device="meta", dtype=torch.bfloat16, **PERSONAPLEX_LM_KWARGS)
    params = sum(p.numel() for p in lm.parameters())
    assert 8.36e9 < params < 8.38e9
    assert round(params * 2 / 1e9, 1) == 16.7
    assert len(lm.depformer_in) == 16 and lm.num_codebooks == 17 and lm.context == 3000


_INTEROP = """
import torch
from agent_runtime.model.threads import limit_interop_threads
print(limit_interop_threads(), torch.get_num_interop_threads())
"""


@pytest.mark.e2e  # starts a process
def test_torchs_inter_op_pool_follows_the_pods_cpu_share() -> None:
    """A worker given 3 CPUs (OMP_NUM_THREADS=3, from its CPU request in the manifests) runs 3 inter-op threads, not
    one per core of the node; without the variable torch keeps its own choice."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "3"}
    done = subprocess.run([sys.executable, "-c", _INTEROP], capture_output=True, text=True, timeout=120, env=env,
                          check=True)
    assert done.stdout.split() == ["3", "3"]
    env.pop("OMP_NUM_THREADS")
    done = subprocess.run([sys.executable, "-c", _INTEROP], capture_output=True, text=True, timeout=120, env=env,
                          check=True)
    assert done.stdout.split()[0] == "None"
