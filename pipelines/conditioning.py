"""Text conditioning the A1111 way: weighted, 75-token chunks, textual inversion, clip skip, SDXL pooling.

diffusers' ``encode_prompt`` truncates at 77 tokens and knows no emphasis, so the engine builds
``prompt_embeds`` itself and hands them to the pipeline:

* the prompt is split into emphasis fragments (``prompts.parse_attention``) and tokenised without specials;
* tokens are packed into 75-token chunks (``BREAK`` forces a new chunk; a chunk that fills up moves the
  words after the last comma, within 20 tokens, to the next one; an embedding never straddles chunks),
  each chunk wrapped as ``[BOS] tokens [EOS] pad...`` and encoded separately, then concatenated along the
  sequence: ``[1, 77*k, dim]``;
* emphasis multiplies each token's hidden state by its weight, then rescales the chunk back to its
  original mean (A1111 "Original" emphasis);
* textual-inversion vectors replace the token embeddings at their positions through a forward hook on the
  encoder's token-embedding table that exists only during the call, so nothing is added to the tokenizer
  or the model and nothing has to be unloaded afterwards;
* SDXL concatenates both encoders' penultimate states; the pooled embedding comes from the first chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from pipelines.prompts import BREAK, parse_attention
from pipelines.types import InvalidRequestError

logger = logging.getLogger(__name__)

CHUNK = 75
COMMA_BACKTRACK = 20


@dataclass(frozen=True)
class Embedding:
    """Loaded textual-inversion vectors per encoder key ("clip_l" for CLIP-L/SD1, "clip_g" for OpenCLIP-G)."""

    name: str
    vectors: Mapping[str, torch.Tensor]

    @property
    def length(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompt: ``embeds`` [1, 77*k, dim]; ``pooled`` [1, proj] for SDXL, else None."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    embeddings_used: frozenset[str] = frozenset()

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK + 2)


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)  # (offset in the 77-token chunk, embedding)


@dataclass
class _Slot:
    """One text encoder of the pipeline and how its output is read."""

    tokenizer: object
    encoder: torch.nn.Module
    key: str  # TI vector key
    penultimate: bool  # SDXL always reads hidden_states[-2] without the final layer norm (clip skip ignored)
    pooled: bool  # the encoder whose projected EOS state is SDXL's pooled embedding


def _slots(pipe) -> list[_Slot]:
    sdxl = hasattr(pipe, "text_encoder_2")
    slots = []
    if getattr(pipe, "text_encoder", None) is not None:
        slots.append(_Slot(pipe.tokenizer, pipe.text_encoder, "clip_l", sdxl, False))
    if sdxl and getattr(pipe, "text_encoder_2", None) is not None:
        slots.append(_Slot(pipe.tokenizer_2, pipe.text_encoder_2, "clip_g", True, True))
    if not slots:
        raise InvalidRequestError("checkpoint", "the pipeline has no text encoder")
    return slots


@contextmanager
def _embedding_overrides(encoder: torch.nn.Module, chunks: list[_Chunk], key: str) -> Iterator[None]:
    """Replace token embeddings at the TI positions for the duration of one forward call."""
    if not any(c.fixes for c in chunks):
        yield
        return

    def hook(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, chunk in enumerate(chunks):
            for offset, emb in chunk.fixes:
                vec = emb.vectors[key].to(device=output.device, dtype=output.dtype)
                output[row, offset:offset + vec.shape[0]] = vec
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class PromptEncoder:
    """Encodes prompts for one pipeline with a fixed clip skip and set of available embeddings.

    Token sequences of embedding names are matched in the token stream (as A1111 does), so an embedding
    is used wherever its name appears as words, in positive and negative prompts alike.
    """

    def __init__(self, pipe, *, clip_skip: int = 1, embeddings: Mapping[str, Embedding] | None = None) -> None:
        self.slots = _slots(pipe)
        self.clip_skip = clip_skip
        self.embeddings = dict(embeddings or {})
        for slot in self.slots:
            layers = slot.encoder.config.num_hidden_layers
            if not slot.penultimate and self.clip_skip > layers:
                raise InvalidRequestError(
                    "clip_skip", f"`clip_skip` must be at most {layers} for this model's text encoder ({layers} "
                                 f"layers) but is {clip_skip}")
        self._lookup = [self._embedding_lookup(slot) for slot in self.slots]
        self._empty: Conditioning | None = None

    def _embedding_lookup(self, slot: _Slot) -> dict[int, list[tuple[list[int], Embedding]]]:
        table: dict[int, list[tuple[list[int], Embedding]]] = {}
        for emb in self.embeddings.values():
            if slot.key not in emb.vectors:
                continue
            ids = slot.tokenizer(emb.name, add_special_tokens=False).input_ids
            if ids:
                table.setdefault(ids[0], []).append((ids, emb))
        for candidates in table.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)
        return table

    # -- tokenisation ---------------------------------------------------------------------------
    def _chunks(self, slot_index: int, text: str) -> tuple[list[_Chunk], set[str]]:
        slot = self.slots[slot_index]
        tok = slot.tokenizer
        lookup = self._lookup[slot_index]
        comma = tok.get_vocab().get(",</w>")
        fragments = parse_attention(text)
        texts = [t for t, w in fragments if not (t == BREAK and w == -1)]
        token_lists = iter(tok(texts, add_special_tokens=False, truncation=False).input_ids if texts else [])
        chunks: list[_Chunk] = []
        chunk = _Chunk()
        last_comma = -1
        used: set[str] = set()

        def close() -> None:
            nonlocal chunk, last_comma
            chunks.append(chunk)
            chunk = _Chunk()
            last_comma = -1

        for frag_text, weight in fragments:
            if frag_text == BREAK and weight == -1:
                close()
                continue
            tokens = next(token_lists)
            pos = 0
            while pos < len(tokens):
                token = tokens[pos]
                if token == comma:
                    last_comma = len(chunk.tokens)
                elif len(chunk.tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                    moved_t, moved_w = chunk.tokens[cut:], chunk.weights[cut:]
                    moved_f = [(o - cut, e) for o, e in chunk.fixes if o >= cut]
                    chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                    chunk.fixes = [(o, e) for o, e in chunk.fixes if o < cut]
                    close()
                    chunk.tokens, chunk.weights, chunk.fixes = moved_t, moved_w, moved_f
                if len(chunk.tokens) == CHUNK:
                    close()
                match = self._match(lookup, tokens, pos)
                if match is None:
                    chunk.tokens.append(token)
                    chunk.weights.append(weight)
                    pos += 1
                    continue
                ids, emb = match
                n = emb.vectors[slot.key].shape[0]
                if n > CHUNK:
                    raise InvalidRequestError("prompt", f"embedding {emb.name!r} has {n} vectors, more than {CHUNK}")
                if len(chunk.tokens) + n > CHUNK:
                    close()
                chunk.fixes.append((len(chunk.tokens), emb))
                chunk.tokens.extend([ids[0]] * n)  # placeholder ids; the hook overwrites their embeddings
                chunk.weights.extend([weight] * n)
                used.add(emb.name)
                pos += len(ids)
        if chunk.tokens or not chunks:
            close()
        return chunks, used

    @staticmethod
    def _match(lookup, tokens: list[int], pos: int):
        for ids, emb in lookup.get(tokens[pos], ()):
            if tokens[pos:pos + len(ids)] == ids:
                return ids, emb
        return None

    # -- encoding -------------------------------------------------------------------------------
    def _encode_slot(self, slot: _Slot, chunks: list[_Chunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tok = slot.tokenizer
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        ids, weights = [], []
        for chunk in chunks:
            fill = CHUNK - len(chunk.tokens)
            ids.append([bos, *chunk.tokens, eos] + [pad] * fill)
            weights.append([1.0, *chunk.weights, 1.0] + [1.0] * fill)
            # fixes were recorded without BOS; shift them by one
        shifted = [_Chunk(c.tokens, c.weights, [(o + 1, e) for o, e in c.fixes]) for c in chunks]
        device = next(slot.encoder.parameters()).device
        input_ids = torch.tensor(ids, device=device)
        with torch.no_grad(), _embedding_overrides(slot.encoder, shifted, slot.key):
            out = slot.encoder(input_ids, output_hidden_states=True)
        if slot.penultimate:
            # A1111 reads SDXL's encoders at the penultimate layer whatever CLIP_stop_at_last_layers says
            # (its sdxl_clip_l_skip option, off by default, is the only exception), so SDXL prompts and
            # infotexts reproduce there.
            z = out.hidden_states[-2]
        elif self.clip_skip > 1:
            final_norm = getattr(slot.encoder, "text_model", slot.encoder).final_layer_norm
            z = final_norm(out.hidden_states[-self.clip_skip])
        else:
            z = out.last_hidden_state
        w = torch.tensor(weights, device=z.device, dtype=z.dtype)
        if bool((w != 1.0).any()):
            rows = []
            for i in range(z.shape[0]):
                original_mean = z[i].mean()
                weighted = z[i] * w[i].unsqueeze(-1)
                rows.append(weighted * (original_mean / weighted.mean()))
            z = torch.stack(rows)
        pooled = out.text_embeds[:1] if slot.pooled else None
        return z.reshape(1, -1, z.shape[-1]), pooled

    def encode(self, text: str) -> Conditioning:
        """Encode one prompt (extra-network tags already removed)."""
        per_slot = [self._chunks(i, text) for i in range(len(self.slots))]
        count = max(len(c) for c, _ in per_slot)
        parts, pooled = [], None
        used: set[str] = set()
        for slot, (chunks, slot_used) in zip(self.slots, per_slot, strict=True):
            chunks = chunks + [_Chunk() for _ in range(count - len(chunks))]
            z, p = self._encode_slot(slot, chunks)
            parts.append(z)
            pooled = p if p is not None else pooled
            used |= slot_used
        return Conditioning(torch.cat(parts, dim=-1), pooled, frozenset(used))

    def empty(self) -> Conditioning:
        """The encoding of the empty prompt (one chunk), used to pad conditionings to the same length."""
        if self._empty is None:
            self._empty = self.encode("")
        return self._empty

    def zeros_like(self, cond: Conditioning) -> Conditioning:
        """SDXL's "force zeros for empty negative prompt" (diffusers and A1111 both do this)."""
        return Conditioning(torch.zeros_like(cond.embeds),
                            None if cond.pooled is None else torch.zeros_like(cond.pooled))


def pad_to_chunks(cond: Conditioning, chunks: int, empty: Conditioning) -> Conditioning:
    """Append empty-prompt chunks until ``cond`` has ``chunks`` chunks (A1111 pads cond/uncond this way)."""
    missing = chunks - cond.chunks
    if missing <= 0:
        return cond
    filler = empty.embeds if bool(cond.embeds.any()) else torch.zeros_like(empty.embeds)
    embeds = torch.cat([cond.embeds, *([filler] * missing)], dim=1)
    return Conditioning(embeds, cond.pooled, cond.embeddings_used)
