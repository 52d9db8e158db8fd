"""YAML texts that cost far more to read than their size, as attackers send them: aliases
that expand exponentially, nesting deep enough to overflow PyYAML's composer (or to keep its scanner
busy for half a minute), and persona bodies whose line ends YAML reads differently from a splice."""

from __future__ import annotations

# Characters YAML (1.1, as PyYAML reads it) takes for a line end besides \n.
OTHER_LINE_BREAKS = ("\r", "\x85", "\u2028", "\u2029")


def alias_bomb_lines(width: int = 9, depth: int = 8, *, key: str = "b") -> list[str]:
    """``depth`` lines, each a list of ``width`` aliases of the line above: width**depth values."""
    lines = [f"{key}0: &{key}0 [x]"]
    for level in range(1, depth + 1):
        aliases = ",".join([f"*{key}{level - 1}"] * width)
        lines.append(f"{key}{level}: &{key}{level} [{aliases}]")
    return lines


def alias_bomb_body(width: int = 9, depth: int = 8) -> str:
    """A persona body of ~460 bytes holding 9**8 (43 million) values once its aliases are expanded."""
    return "prompt: You are Sam.\nvoice: {preset: NATF0}\n" + "\n".join(alias_bomb_lines(width, depth)) + "\n"


def deep_body(levels: int = 2000) -> str:
    """A persona body of ~4 KB nested ``levels`` deep."""
    return "prompt: " + "[" * levels + "]" * levels + "\n"


def deep_value(levels: int) -> str:
    """A flow value nested ``levels`` deep: 100 000 levels are 200 KB, within the tenant file's size."""
    return "[" * levels + "]" * levels


def line_break_injection(line_break: str) -> str:
    """A persona body that, spliced by re-indenting only \\n, writes tenant-level keys: a call limit of
    500 and escalation to a premium number."""
    lines = ["prompt: You are Sam.", "voice: {preset: NATF0}", "limits:", "  max_concurrent_calls: 500",
             "escalation:", "  transfer_to: sip:+19005550100@premium.example", "  dtmf_digit: 9"]
    return line_break.join(lines) + line_break
