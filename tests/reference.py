"""A plain, unbatched, step-by-step PersonaPlex priming written only against moshi's public API.

It is the yardstick the runtime's fast priming is held to: one ``LMGen.step`` per prompt frame, with
the prompt forced through ``on_text_hook``/``on_audio_hook``, exactly as the reference server steps.
"""

from __future__ import annotations

import torch
from moshi.models import LMGen

from agent_runtime.model import ModelBundle

SILENCE_FRAMES = 6


def reference_frames(bundle: ModelBundle, voice_codes: torch.Tensor, text_tokens: list[int]):
    """(text, agent[8], user[8]) per prompt frame: voice, 6 silence, text, 6 silence."""
    pad = bundle.text_pad_id
    silence = bundle.silence_codes.cpu()
    sine = bundle.sine_codes.cpu()
    frames = [(pad, voice_codes[:, i], sine) for i in range(voice_codes.shape[1])]
    frames += [(pad, silence, sine)] * SILENCE_FRAMES
    frames += [(tok, silence, sine) for tok in text_tokens]
    frames += [(pad, silence, sine)] * SILENCE_FRAMES
    return frames


@torch.no_grad()
def run_reference(bundle: ModelBundle, voice_codes, text_tokens, user_codes: list[torch.Tensor]):
    """Prime step by step, then feed ``user_codes`` (one [8] tensor per frame) greedily.

    Returns the [9] output (text + agent codes) of every conversational step.
    """
    frames = reference_frames(bundle, voice_codes, text_tokens)
    force: dict[str, torch.Tensor | None] = {"text": None, "audio": None}

    def on_text(tokens: torch.Tensor) -> None:
        if force["text"] is not None:
            tokens[:] = force["text"]

    def on_audio(tokens: torch.Tensor) -> None:
        if force["audio"] is not None:
            wanted = force["audio"]
            keep = wanted >= 0
            tokens[0, keep] = wanted[keep]

    lm_gen = LMGen(bundle.lm, use_sampling=False, on_text_hook=on_text, on_audio_hook=on_audio)
    outputs = []
    with lm_gen.streaming(1):
        n = len(frames)
        for c, (_, agent, user) in enumerate(frames):
            # Step c reads position c and writes text/codebook 0 of frame c+1, codebooks 1-7 of frame c.
            audio = torch.full((8,), -1, dtype=torch.long)
            audio[1:] = agent[1:]
            if c + 1 < n:
                nxt_text, nxt_agent, _ = frames[c + 1]
                force["text"] = torch.tensor([nxt_text])
                audio[0] = nxt_agent[0]
            else:  # the last prompt step samples the first conversational text and codebook 0
                force["text"] = None
            force["audio"] = audio
            lm_gen.step(user.view(1, 8, 1))
        force["text"] = force["audio"] = None
        for codes in user_codes:
            out = lm_gen.step(codes.view(1, 8, 1))
            outputs.append(out[0, :, 0].clone())
    return outputs
