"""
Knowledge editing with STEM: change which STEM rows some positions read, and nothing else.

A STEM layer's up-projection at a position is a table row looked up by the token id there, E_l[t]. The
paper's edit keeps the prompt text (its token ids, token embeddings, everything outside the STEM tables)
and makes the positions that spell a SOURCE entity read a TARGET entity's rows instead, in every STEM layer.
If what the model knows about an entity lives in its rows, "The capital of Spain is" with Spain->Germany
continues with Berlin.

    python sample.py --edit="Spain->Germany"      # generation; sample.py builds an EditedRows
    python edit_experiment.py                     # does it work? flip rates on country/capital facts

Rules of an edit SOURCE->TARGET (case-sensitive text):
  - Matching is in token space. GPT-2 BPE spells a word differently after a space (" Spain") and without one
    ("Spain" at the start of a text or after a newline), so both forms of SOURCE are matched, each reading
    the rows of the same form of TARGET. No word-boundary check: a form matches wherever its tokens occur.
  - Occurrences are found left to right without overlap; at one start the longer form wins. Edits do not
    chain (with A->B and B->C, A reads B's rows), and two edits whose SOURCEs contain one another
    ("New York" and "York") are refused: which one applies could change as generated text grows.
  - SOURCE m tokens, TARGET n tokens; by edit_mode, source position i = 0..m-1 reads:
      one_to_one  TARGET's token i; m != n is refused
      average     the mean of TARGET's n rows, at every source position
      left_pad    TARGET's token min(i, n-1): aligned left, the last token repeats or the extra ones drop
      right_pad   TARGET's token max(0, n-m+i): aligned right, the first token repeats or the extra ones drop
  - KV cache: a position's rows are decided when the model is fed it, from the prompt (all of it) or, for a
    generated position p, from tokens[:p+1]. A SOURCE completed by generated text edits only its positions
    from the completing token on; the uncached path is told prompt_len and follows the same rule, so both
    give the same tokens.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import StemRows

MODES = ("one_to_one", "average", "left_pad", "right_pad")


class EditError(ValueError):
    """A bad edit request: command lines print it as one line and exit 1."""


@dataclass(frozen=True)
class Edit:
    source: str
    target: str
    forms: tuple  # ((source ids, target ids), ...): the after-a-space form first, then the bare one


def parse_edit(text):
    parts = text.split("->")
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise EditError(f"bad edit {text!r}: write SOURCE->TARGET with both sides non-empty, "
                        f"e.g. --edit=\"Spain->Germany\"")
    return parts[0].strip(), parts[1].strip()


def _contains(big, small):
    return any(big[i:i + len(small)] == small for i in range(len(big) - len(small) + 1))


def make_edits(specs, enc):
    """Edits from "SOURCE->TARGET" strings, each with its token forms under tokenizer enc."""
    edits = []
    for spec in specs:
        source, target = parse_edit(spec)
        if any(e.source == source for e in edits):
            raise EditError(f"{source!r} is edited twice; give each SOURCE once")
        forms = []
        for prefix in (" ", ""):
            form = (tuple(enc.encode_ordinary(prefix + source)), tuple(enc.encode_ordinary(prefix + target)))
            if form not in forms:
                forms.append(form)
        edits.append(Edit(source, target, tuple(forms)))
    for a in edits:
        for b in edits:
            if a is not b and any(_contains(fa, fb) for fa, _ in a.forms for fb, _ in b.forms):
                raise EditError(f"the SOURCE {b.source!r} occurs inside the SOURCE {a.source!r}: overlapping "
                                f"edits are ambiguous, give only one of them")
    return edits


def find_matches(ids, edits):
    """Occurrences of the edits' SOURCE forms in the list ids: [(start, end, target ids, edit)], left to
    right, not overlapping; at one start the longest form wins."""
    forms = sorted(((s, t, e) for e in edits for s, t in e.forms), key=lambda f: -len(f[0]))
    by_first = {}
    for form in forms:
        by_first.setdefault(form[0][0], []).append(form)
    matches, i = [], 0
    while i < len(ids):
        for src, tgt, edit in by_first.get(ids[i], ()):
            if tuple(ids[i:i + len(src)]) == src:
                matches.append((i, i + len(src), tgt, edit))
                i += len(src)
                break
        else:
            i += 1
    return matches


def plan_edits(ids, edits, mode, prompt_len=None):
    """{position: target token ids whose rows' mean that position reads} for one sequence of ids (a list).
    prompt_len: how many ids were fed at once before generation (None: all of them), see the KV-cache rule."""
    if mode not in MODES:
        raise EditError(f"unknown edit mode {mode!r}: choose one of {', '.join(MODES)}")
    horizon = len(ids) if prompt_len is None else prompt_len
    plan = {}
    for start, end, tgt, edit in find_matches(ids, edits):
        m, n = end - start, len(tgt)
        if mode == "one_to_one" and m != n:
            raise EditError(f"--edit_mode=one_to_one needs SOURCE and TARGET of equal token length, but "
                            f"{edit.source!r} is {m} token(s) {list(ids[start:end])} here and {edit.target!r} is "
                            f"{n} {list(tgt)}; use --edit_mode=average, left_pad or right_pad")
        for i in range(m):
            p = start + i
            if end > max(p + 1, horizon):
                continue  # the span was not complete when p was fed: p keeps its own rows
            if mode == "average":
                plan[p] = tgt
            elif mode == "right_pad":
                plan[p] = (tgt[max(0, n - m + i)],)
            else:  # one_to_one (m == n) and left_pad
                plan[p] = (tgt[min(i, n - 1)],)
    return plan


def table_rows(table):
    """stem_rows_fn that reads an in-memory table: the window's distinct ids and their rows."""
    def rows_fn(tokens, start):
        ids, inverse = torch.unique(tokens[:, start:], return_inverse=True)
        return StemRows(table[ids], inverse, ids)
    return rows_fn


def edited_rows(base, tokens, start, plans):
    """StemRows for positions start.. of tokens [B, T]: each position reads its own token's row from base
    (a stem_rows_fn), except those in plans[b] (from plan_edits), which read their targets' rows."""
    window = tokens[:, start:]
    wanted = {tgt for plan in plans for p, tgt in plan.items() if p >= start}
    if not wanted:
        return base(tokens, start)
    # one base call for the window's own ids and every target id, so offloaded rows arrive in one copy
    extra = torch.tensor(sorted({t for tgt in wanted for t in tgt}), dtype=window.dtype)
    ids = torch.unique(torch.cat([window.flatten().cpu(), extra]))
    got = base(ids.view(1, -1).to(tokens.device), 0)
    rows = F.embedding(got.inverse[0], got.rows)  # row k is ids[k]'s row, however base ordered its rows
    index = {t: k for k, t in enumerate(ids.tolist())}
    # a multi-token target under "average" needs a new row: the mean of its tokens' rows
    averaged = sorted(tgt for tgt in wanted if len(tgt) > 1)
    for k, tgt in enumerate(averaged):
        index[tgt] = len(ids) + k
    if averaged:
        means = torch.stack([rows[[index[t] for t in tgt]].mean(dim=0) for tgt in averaged])
        rows = torch.cat([rows, means])
    inverse = torch.searchsorted(ids.to(tokens.device), window.contiguous())  # each position's own row
    for b, plan in enumerate(plans):
        for p, tgt in plan.items():
            if p >= start:
                inverse[b, p - start] = index[tgt] if len(tgt) > 1 else index[tgt[0]]
    # an averaged row belongs to no single token: id -1
    row_ids = torch.cat([ids, torch.full((len(averaged),), -1, dtype=ids.dtype)])
    return StemRows(rows, inverse, row_ids)


class EditedRows:
    """stem_rows_fn (tokens, start) -> StemRows for GPT.generate or GPT.forward, with edits applied.

    base: where rows come from, itself a stem_rows_fn: table_rows(model.stem_table) for a model in memory,
    a stem_offload.HostRowFetcher for a table in host memory. prompt_len: the length of the prompt that
    generate feeds at once (see the KV-cache rule in the module docstring); None for one plain forward."""

    def __init__(self, base, edits, mode="one_to_one", prompt_len=None):
        if mode not in MODES:
            raise EditError(f"unknown edit mode {mode!r}: choose one of {', '.join(MODES)}")
        self.base, self.edits, self.mode, self.prompt_len = base, edits, mode, prompt_len

    def plans(self, tokens):
        return [plan_edits(row, self.edits, self.mode, self.prompt_len) for row in tokens.tolist()]

    def __call__(self, tokens, start):
        return edited_rows(self.base, tokens, start, self.plans(tokens))


def check_model(model):
    if model.stem_table is None:
        raise EditError(f"--edit needs a model with STEM layers, but this one has ffn={model.config.ffn!r} "
                        f"and no STEM tables to edit")


def check_prompt(ids, edits, mode):
    """Refuse edits whose SOURCE is not in the prompt (a list of ids), and one_to_one length mismatches."""
    for edit in edits:
        if not find_matches(ids, [edit]):
            forms = " or ".join(str(list(s)) for s, _ in edit.forms)
            raise EditError(f"SOURCE {edit.source!r} is not in the prompt (looked for the tokens {forms}); "
                            f"edits act on the prompt's own tokens, so the prompt must mention it")
    plan_edits(ids, edits, mode)
