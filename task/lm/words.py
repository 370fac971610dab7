"""Words of token blocks, for word-level perplexity: exp(total NLL / number of words).

Token-level perplexity depends on the tokenizer; the paper and the PTB literature report it per
word. The convention here is PTB's as Mikolov's and later language-model code count it: a word
is a whitespace-separated token of the normalized text (``<unk>`` and ``N`` are words), and the
end of every line is one more (PTB's ``<eos>``; here a newline, or the EOS after a document). The
total NLL is the same sum as for token-level perplexity: only the count it is divided by changes.

A token *starts* a word when it has text and begins with whitespace or follows whitespace (or an
EOS, or the start of the stream); sub-word continuations (``unk`` after `` <``) do not.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=4)
def _token_kinds(tokenizer) -> dict[str, torch.Tensor]:
    """Per vocabulary id: has text, starts with whitespace, ends with whitespace, ends a line."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)
    has_text = torch.tensor([bool(t.strip()) and i not in special for i, t in enumerate(texts)])
    lead = torch.tensor([t[:1].isspace() for t in texts])
    trail = torch.tensor([t[-1:].isspace() or i in special for i, t in enumerate(texts)])
    line_end = torch.tensor([("\n" in t and not t.strip()) for t in texts])
    if tokenizer.eos_token_id is not None:
        line_end[tokenizer.eos_token_id] = True
    return {"has_text": has_text, "lead": lead, "trail": trail, "line_end": line_end}


def word_units(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """Bool mask over a 1-D token stream: True where a token starts a word or ends a line."""
    kinds = _token_kinds(tokenizer)
    after_space = torch.ones_like(ids, dtype=torch.bool)  # the stream's first token starts a word
    after_space[1:] = kinds["trail"][ids[:-1]]
    starts = kinds["has_text"][ids] & (kinds["lead"][ids] | after_space)
    return starts | kinds["line_end"][ids]


def words_per_block(tokenizer, blocks: torch.Tensor) -> torch.Tensor:
    """Words among the *predicted* tokens of each block (all but its first), for blocks cut
    from one stream in order (task.lm.data.token_blocks): shape (N,)."""
    units = word_units(tokenizer, blocks.reshape(-1)).view(blocks.shape)
    return units[:, 1:].sum(dim=1)
