"""Text encoders for language-image pretraining: radiology reports -> one embedding per report.

Two kinds, both ``forward(texts: Sequence[str]) -> [B, width]`` in their own width (the projection into the joint
image-text space belongs to the CLIP pretext):

- `SmallTextEncoder`: a small pre-norm transformer (the ViT's `Block`) over the words of `ReportTokenizer`, whose
  vocabulary is built from the training reports; trained from scratch, for users without a medical language model.
  The vocabulary travels in the state dict, so a checkpoint restores the tokenizer.
- `HuggingFaceTextEncoder`: a BERT-family model (BiomedBERT, CXR-BERT, RadBERT ...) from a local folder written by
  ``save_pretrained``; by default frozen except its LayerNorms, as HLIP and CT-CLIP train it. ``transformers`` is
  imported only when one is built (``pip install 'voco[text]'``), and nothing is ever downloaded.

`build_text_encoder` makes either from the keys of a bundle config.

Both also offer a token-level API for objectives that work on words and sentences (MG-3D's masked language
modelling and sentence features, `voco.pretext.mg3d`): ``word_pieces(text)``, ``special_token_ids``,
``vocabulary_size``, ``embed_tokens`` (the embedding layer alone), ``encode_tokens`` and ``token_strings``;
`tokenize_sentences` lays reports out sentence by sentence and `whole_word_mask` masks them as BERT does.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from voco.errors import ConfigError, MissingDependencyError
from voco.networks.vit import Block

TEXT_ENCODERS = ("small", "huggingface")
POOLINGS = ("cls", "mean")
MASK_TOKEN = "[MASK]"  # a word the report tokenizer never produces from text: a vocabulary holding it can mask
IGNORE_INDEX = -100  # label of a token that is not predicted (torch's cross_entropy default)

# Numbers (3, 3.5) before words (t2, ct, hypodense) before single punctuation marks (. , - / ( ) %).
_TOKEN_PATTERN = re.compile(r"\d+(?:\.\d+)*|[^\W\d_][^\W_]*|[^\w\s]|_")


# --------------------------------------------------------------------------------------------------
# The small encoder and its tokenizer
# --------------------------------------------------------------------------------------------------
class ReportTokenizer:
    """Word-level tokenizer for radiology reports, vocabulary built from the training reports.

    Our own rather than a Hugging Face WordPiece trainer: a word vocabulary of a few thousand report words needs no
    extra package, builds deterministically in one pass, and is a plain list of strings that a checkpoint can hold.

    A report becomes ``[CLS] word ... word [SEP]``; words outside the vocabulary become ``[UNK]``; a report longer than
    ``max_length`` tokens keeps its first ``max_length - 2`` words and still ends with ``[SEP]``; a batch is padded
    with ``[PAD]`` to its longest report.

    Args:
        vocabulary: the words; the special tokens are put first (ids 0..3) whether or not the list holds them.
        max_length: most tokens per report, ``[CLS]`` and ``[SEP]`` included (at least 2).
        lowercase: lowercase the text before splitting it into words.

    >>> tokenizer = ReportTokenizer(["no", "effusion", "."])
    >>> tokenizer.vocabulary
    ['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'no', 'effusion', '.']
    >>> token_ids, attention_mask = tokenizer(["No effusion.", "No mass"])
    >>> token_ids.tolist(), attention_mask.tolist()
    ([[2, 4, 5, 6, 3], [2, 4, 1, 3, 0]], [[True, True, True, True, True], [True, True, True, True, False]])
    """

    SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # ids 0..3
    PAD, UNK, CLS, SEP = range(4)

    def __init__(self, vocabulary: Sequence[str], max_length: int = 128, lowercase: bool = True) -> None:
        if int(max_length) < 2:
            raise ConfigError(f"the text max_length is {max_length}; use at least 2 ([CLS] and [SEP]).")
        words = [str(word) for word in vocabulary if word not in self.SPECIAL]
        repeated = sorted(word for word, count in Counter(words).items() if count > 1)
        if repeated:
            raise ConfigError(f"the text vocabulary holds {repeated[:5]} more than once; give each word once.")
        self.vocabulary: list[str] = list(self.SPECIAL) + words
        self.max_length, self.lowercase = int(max_length), bool(lowercase)
        self.token_ids = {word: index for index, word in enumerate(self.vocabulary)}

    @classmethod
    def from_reports(cls, reports: Iterable[str], max_size: int = 8000, min_count: int = 1, max_length: int = 128,
                     lowercase: bool = True) -> ReportTokenizer:
        """The ``max_size - 4`` most frequent words of ``reports`` seen at least ``min_count`` times (ties broken
        alphabetically, so the vocabulary is the same on every run); ``max_size`` counts the special tokens.
        Missing reports (None, "") are skipped.

        >>> ReportTokenizer.from_reports(["No mass.", "Mass in the liver."], max_size=7).vocabulary
        ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '.', 'mass', 'in']
        """
        if int(max_size) <= len(cls.SPECIAL):
            raise ConfigError(f"the text vocabulary size is {max_size}; use more than {len(cls.SPECIAL)} (the special "
                              "tokens), e.g. 8000.")
        splitter = cls((), max_length, lowercase)
        texts = [str(report) for report in reports if report]
        counts = Counter(word for text in texts for word in splitter.words(text))
        frequent = sorted((word for word, count in counts.items() if count >= min_count and word not in cls.SPECIAL),
                          key=lambda word: (-counts[word], word))
        if not frequent:
            raise ConfigError(f"no word occurs at least {min_count} times in the {len(texts)} training reports with "
                              "text; give the scans their report text or lower min_count.")
        return cls(frequent[: int(max_size) - len(cls.SPECIAL)], max_length, lowercase)

    def __len__(self) -> int:
        return len(self.vocabulary)

    def words(self, text: str) -> list[str]:
        """The words, numbers and punctuation marks of a text, in order (lowercased if ``lowercase``).

        >>> ReportTokenizer([]).words("Lesion 3.5 cm (T2-hyperintense).")
        ['lesion', '3.5', 'cm', '(', 't2', '-', 'hyperintense', ')', '.']
        """
        return _TOKEN_PATTERN.findall(text.lower() if self.lowercase else text)

    def encode(self, text: str) -> list[int]:
        """One text -> its token ids ``[CLS] ... [SEP]``, at most ``max_length`` of them."""
        words = self.words(text)[: self.max_length - 2]
        return [self.CLS, *(self.token_ids.get(word, self.UNK) for word in words), self.SEP]

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> ``(token ids int64 [B, L], attention mask bool [B, L])``, L = the longest in the batch
        (``<= max_length``); the mask is False at ``[PAD]``."""
        if isinstance(texts, str):
            raise ConfigError("the tokenizer takes a list of reports, got one string; wrap it in a list.")
        encoded = [self.encode(text) for text in texts]
        length = max((len(ids) for ids in encoded), default=2)
        token_ids = torch.full((len(encoded), length), self.PAD, dtype=torch.long)
        for row, ids in enumerate(encoded):
            token_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return token_ids, token_ids != self.PAD

    def __repr__(self) -> str:
        return f"ReportTokenizer({len(self)} tokens, max_length={self.max_length}, lowercase={self.lowercase})"


class SmallTextEncoder(nn.Module):
    """A small pre-norm transformer over ReportTokenizer tokens; the report embedding is the final [CLS] token.

    Token + learned position embeddings, ``depth`` ViT `Block` s (padding hidden from attention by the key mask),
    a final LayerNorm. The vocabulary is saved in the state dict (``get_extra_state``, plain lists and strings, so
    ``torch.load(..., weights_only=True)`` reads it) and restored with the weights.

    Args:
        vocabulary: the tokenizer's words (e.g. ``ReportTokenizer.from_reports(reports).vocabulary``).
        width: embedding width (the output width).
        depth: transformer blocks.
        num_heads: attention heads (must divide ``width``).
        max_length: most tokens per report; longer reports are truncated.
        dropout: dropout on the token + position embeddings (the blocks have none).

    Shapes: ``forward(texts) -> [B, width]``;
    ``encode_tokens(token_ids [B, L], attention_mask [B, L]) -> [B, L, width]``.

    >>> encoder = SmallTextEncoder(["no", "mass", "."], width=32, depth=1, num_heads=2)
    >>> encoder(["No mass.", "Mass."]).shape
    torch.Size([2, 32])
    """

    def __init__(self, vocabulary: Sequence[str], width: int = 256, depth: int = 4, num_heads: int = 4,
                 max_length: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokenizer = ReportTokenizer(vocabulary, max_length)
        self.width, self.max_length = int(width), int(max_length)
        self.token_embedding = nn.Embedding(len(self.tokenizer), self.width)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.max_length, self.width))
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(self.width, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(self.width)
        nn.init.trunc_normal_(self.token_embedding.weight, std=0.02)  # BERT's / CLIP's text initialisation
        nn.init.trunc_normal_(self.position_embedding, std=0.02)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The embedding layer alone: token + position embeddings ``[B, L, width]`` (no transformer block)."""
        length = token_ids.shape[1]
        if length > self.max_length:
            raise ConfigError(f"{length} tokens exceed the text encoder's max_length {self.max_length}; tokenize "
                              "with its own tokenizer, which truncates.")
        return self.embedding_dropout(self.token_embedding(token_ids) + self.position_embedding[:, :length])

    def encode_tokens(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` and mask ``[B, L]`` (True = a real token) -> normalised tokens ``[B, L, width]``."""
        x = self.embed_tokens(token_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # [B, heads, queries, keys]: padding is never attended to
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Reports -> ``[B, width]`` (the final [CLS] token), on the device of the parameters."""
        token_ids, attention_mask = self.tokenizer(texts)
        device = self.token_embedding.weight.device
        return self.encode_tokens(token_ids.to(device), attention_mask.to(device))[:, 0]

    @property
    def vocabulary_size(self) -> int:
        return len(self.tokenizer)

    @property
    def special_token_ids(self) -> dict[str, int | None]:
        """Ids of ``pad``, ``cls``, ``sep`` and ``mask`` (None unless the vocabulary holds ``[MASK]``: build the
        encoder with ``build_text_encoder(..., mask_token=True)`` or ``with_mask_token(vocabulary)``)."""
        tokenizer = self.tokenizer
        return {"pad": tokenizer.PAD, "cls": tokenizer.CLS, "sep": tokenizer.SEP,
                "mask": tokenizer.token_ids.get(MASK_TOKEN)}

    def word_pieces(self, text: str) -> list[tuple[int, bool]]:
        """A text's token ids without ``[CLS]``/``[SEP]``, each with whether it starts a word (every token is a word
        here), untruncated."""
        return [(self.tokenizer.token_ids.get(word, self.tokenizer.UNK), True) for word in self.tokenizer.words(text)]

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.vocabulary[int(index)] for index in token_ids]

    def get_extra_state(self) -> dict[str, Any]:
        return {"vocabulary": list(self.tokenizer.vocabulary), "max_length": self.tokenizer.max_length,
                "lowercase": self.tokenizer.lowercase}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        vocabulary = list(state["vocabulary"])
        if len(vocabulary) != self.token_embedding.num_embeddings:
            raise ConfigError(f"the checkpoint's text vocabulary has {len(vocabulary)} tokens but this encoder's "
                              f"embedding table has {self.token_embedding.num_embeddings}; build the encoder with "
                              f"vocabulary_size={len(vocabulary)} (or the checkpoint's vocabulary).")
        if int(state["max_length"]) != self.max_length:
            raise ConfigError(f"the checkpoint's text encoder has max_length {state['max_length']} but this one "
                              f"{self.max_length}; build it with max_length={state['max_length']}.")
        self.tokenizer = ReportTokenizer(vocabulary, self.max_length, bool(state["lowercase"]))


# --------------------------------------------------------------------------------------------------
# A pretrained BERT-family encoder from a local folder
# --------------------------------------------------------------------------------------------------
def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise MissingDependencyError(
            "a Hugging Face text encoder needs the Python package 'transformers', which is not installed; run "
            f"`pip install 'voco[text]'` and try again ({error}).") from error
    return transformers


def is_layer_norm(module: nn.Module) -> bool:
    """Whether a module is a LayerNorm (torch's, or a model's own class named ...LayerNorm)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


class HuggingFaceTextEncoder(nn.Module):
    """A BERT-family encoder (e.g. BiomedBERT, CXR-BERT, RadBERT) from a local folder saved with save_pretrained.

    The folder holds the model (``config.json``, weights) and its tokenizer; it is read with
    ``local_files_only=True``, so nothing is downloaded. Texts are tokenized by the model's own tokenizer and
    truncated to ``max_length`` tokens.

    Args:
        path: the folder. Make it once on a machine with internet, then copy it over:
            ``AutoModel.from_pretrained(name).save_pretrained(folder)`` and
            ``AutoTokenizer.from_pretrained(name).save_pretrained(folder)``.
        freeze: freeze every parameter except the LayerNorm weights and biases, and keep the model in eval mode
            (no dropout) even when the pretext trains (HLIP / CT-CLIP: the norms and the CLIP projection train).
        pooling: ``"cls"`` (the first token's final state) or ``"mean"`` (the mean over the real tokens).
        max_length: most tokens per text.

    Shapes: ``forward(texts) -> [B, width]``, ``width`` = the model's hidden size.

    >>> encoder = HuggingFaceTextEncoder("models/BiomedBERT")  # doctest: +SKIP
    >>> encoder(["No acute abnormality."]).shape  # doctest: +SKIP
    torch.Size([1, 768])
    """

    def __init__(self, path: str | os.PathLike, freeze: bool = True, pooling: str = "cls",
                 max_length: int = 256) -> None:
        super().__init__()
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"the text model folder {str(folder)!r} does not exist or holds no config.json; on a "
                              "machine with internet save the model and its tokenizer there with save_pretrained "
                              "(see HuggingFaceTextEncoder) and copy the folder over.")
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown text pooling {pooling!r}; use one of {', '.join(POOLINGS)}.")
        transformers = _import_transformers()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(f"the text model folder {str(folder)!r} cannot be loaded with transformers "
                              f"{transformers.__version__}; save both the model and its tokenizer there with "
                              f"save_pretrained ({error}).") from error
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT's pooler is never used here; unused parameters would stall DDP
        self.width = int(self.model.config.hidden_size)
        self.pooling, self.freeze = pooling, bool(freeze)
        self.max_length = int(max_length)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and self.max_length > positions:
            raise ConfigError(f"text max_length {max_length} exceeds the {positions} positions of the model in "
                              f"{str(folder)!r}; use at most {positions}.")
        if self.freeze:
            for module in self.model.modules():
                trainable = is_layer_norm(module)
                for parameter in module.parameters(recurse=False):
                    parameter.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> HuggingFaceTextEncoder:
        """Set train/eval mode; a frozen model stays in eval mode (no dropout in a model that is not trained)."""
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> ``[B, width]``, on the device of the model."""
        if isinstance(texts, str):
            raise ConfigError("the text encoder takes a list of reports, got one string; wrap it in a list.")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        # Nothing trainable (everything frozen, or gradients off): run without recording a graph. With trainable
        # LayerNorms the graph is needed through every layer; the frozen weights then get no gradients computed.
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        with torch.set_grad_enabled(needs_graph):
            hidden = self.model(**tokens).last_hidden_state  # [B, L, width]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].to(hidden.dtype)[:, :, None]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def _needs_graph(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())

    def encode_tokens(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` and mask ``[B, L]`` (True = a real token) -> final hidden states ``[B, L, width]``."""
        with torch.set_grad_enabled(self._needs_graph()):
            return self.model(input_ids=token_ids, attention_mask=attention_mask.long()).last_hidden_state

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The embedding layer alone (word + position + token-type embeddings, its LayerNorm) ``[B, L, width]``."""
        with torch.set_grad_enabled(self._needs_graph()):
            return self.model.embeddings(input_ids=token_ids)

    @property
    def vocabulary_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def special_token_ids(self) -> dict[str, int | None]:
        tokenizer = self.tokenizer
        return {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id,
                "mask": tokenizer.mask_token_id}

    def word_pieces(self, text: str) -> list[tuple[int, bool]]:
        """A text's token ids without special tokens, each with whether it starts a word (a WordPiece continuation
        starts with ``##``, as BERT's whole-word masking reads it), untruncated."""
        token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = self.tokenizer.convert_ids_to_tokens(token_ids)
        return [(int(index), not piece.startswith("##")) for index, piece in zip(token_ids, pieces)]

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens([int(index) for index in token_ids]))


# --------------------------------------------------------------------------------------------------
# From a bundle config
# --------------------------------------------------------------------------------------------------
def build_text_encoder(name: str = "small", *, reports: Iterable[str] | None = None, path: str | None = None,
                       freeze: bool = True, width: int = 256, depth: int = 4, num_heads: int = 4,
                       max_length: int = 128, vocabulary_size: int = 8000, min_count: int = 1,
                       vocabulary: Sequence[str] | None = None, pooling: str = "cls",
                       mask_token: bool = False) -> nn.Module:
    """A text encoder from the keys of a bundle config.

    Args:
        name: ``"small"`` (`SmallTextEncoder`, vocabulary from ``reports``) or ``"huggingface"``
            (`HuggingFaceTextEncoder` from the local folder ``path``).
        reports: the training reports (small only).
        vocabulary: small only: a vocabulary to use as it is instead of one built from ``reports`` (e.g. that of
            a checkpoint).
        path: the model folder (huggingface only).
        freeze: huggingface only: train only the LayerNorms.
        pooling: huggingface only: ``"cls"`` or ``"mean"``.
        width, depth, num_heads: small only: the transformer.
        max_length: most tokens per report.
        vocabulary_size, min_count: small only: the vocabulary (special tokens included) and the least count of a word.
        mask_token: small only: add ``[MASK]`` to the vocabulary (masked language modelling; `with_mask_token`).

    >>> build_text_encoder("small", reports=["No mass.", "Liver mass."], width=32, depth=1, num_heads=2).width
    32
    """
    kind = str(name).lower()
    if kind == "small":
        if vocabulary is not None:
            vocabulary = with_mask_token(vocabulary) if mask_token else vocabulary
            return SmallTextEncoder(vocabulary, width, depth, num_heads, max_length)
        if reports is None:
            raise ConfigError("the small text encoder builds its vocabulary from the training reports; pass reports "
                              "(the report texts of the training scans).")
        tokenizer = ReportTokenizer.from_reports(reports, vocabulary_size, min_count, max_length)
        words = with_mask_token(tokenizer.vocabulary) if mask_token else tokenizer.vocabulary
        return SmallTextEncoder(words, width, depth, num_heads, max_length)
    if kind == "huggingface":
        if path is None:
            raise ConfigError("the huggingface text encoder needs path, a local folder with the model and its "
                              "tokenizer saved by save_pretrained.")
        return HuggingFaceTextEncoder(path, freeze=freeze, pooling=pooling, max_length=max_length)
    raise ConfigError(f"unknown text encoder {name!r}; use one of {', '.join(TEXT_ENCODERS)}.")


# --------------------------------------------------------------------------------------------------
# Token level: reports laid out sentence by sentence, whole-word masking
# --------------------------------------------------------------------------------------------------
def with_mask_token(vocabulary: Sequence[str]) -> list[str]:
    """The vocabulary with ``[MASK]`` appended (unchanged if it holds it): a small encoder that can be masked."""
    return list(vocabulary) if MASK_TOKEN in vocabulary else [*vocabulary, MASK_TOKEN]


class SentenceTokens(NamedTuple):
    """Reports tokenized sentence by sentence, ``[CLS] sentence 0 ... sentence S-1 [SEP] [PAD] ...`` (CPU tensors):
    ``token_ids [B, L]`` int64, ``attention_mask [B, L]`` (False at ``[PAD]``), ``sentence_index [B, L]`` (each
    token's 0-based sentence, -1 at ``[CLS]``, ``[SEP]``, ``[PAD]``) and ``word_index [B, L]`` (each token's word
    within its report, -1 at the special tokens)."""

    token_ids: torch.Tensor
    attention_mask: torch.Tensor
    sentence_index: torch.Tensor
    word_index: torch.Tensor


def tokenize_sentences(encoder: nn.Module, reports: Sequence[Sequence[str]]) -> SentenceTokens:
    """Each report's sentences tokenized alone by ``encoder.word_pieces`` and laid out one after the other, so every
    token knows its sentence exactly (MG-3D's clause ranges); at most ``encoder.max_length`` tokens, ``[SEP]`` kept
    last. Sentences with no token left are dropped from the numbering.

    >>> encoder = SmallTextEncoder(["no", "mass", "."], width=8, depth=1, num_heads=2)
    >>> tokens = tokenize_sentences(encoder, [["No mass.", "Mass."]])
    >>> tokens.token_ids.tolist(), tokens.sentence_index.tolist()
    ([[2, 4, 5, 6, 5, 6, 3]], [[-1, 0, 0, 0, 1, 1, -1]])
    """
    special = encoder.special_token_ids
    rows = []
    for sentences in reports:
        pieces = [(token, starts, sentence) for sentence, text in enumerate(sentences)
                  for token, starts in encoder.word_pieces(text)][: int(encoder.max_length) - 2]
        renumber = {sentence: index for index, sentence in enumerate(dict.fromkeys(s for _, _, s in pieces))}
        words, word = [], -1
        for position, (_, starts, sentence) in enumerate(pieces):
            word += bool(starts or position == 0 or pieces[position - 1][2] != sentence)  # words never span sentences
            words.append(word)
        rows.append(([special["cls"], *(p[0] for p in pieces), special["sep"]],
                     [-1, *(renumber[p[2]] for p in pieces), -1], [-1, *words, -1]))
    length = max(len(ids) for ids, _, _ in rows)
    token_ids = torch.full((len(rows), length), int(special["pad"]), dtype=torch.long)
    sentence_index = torch.full((len(rows), length), -1, dtype=torch.long)
    word_index = torch.full((len(rows), length), -1, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for row, (ids, sentence_of, word_of) in enumerate(rows):
        token_ids[row, : len(ids)] = torch.tensor(ids)
        sentence_index[row, : len(ids)] = torch.tensor(sentence_of)
        word_index[row, : len(ids)] = torch.tensor(word_of)
        attention_mask[row, : len(ids)] = True
    return SentenceTokens(token_ids, attention_mask, sentence_index, word_index)


def whole_word_mask(tokens: SentenceTokens, mask_token_id: int, vocabulary_size: int, probability: float = 0.15,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's whole-word masking (Hugging Face's ``DataCollatorForWholeWordMask``) -> (input ids, labels).

    Per report, words are taken in random order, all their pieces at once, skipping a word that would pass the
    budget of ``max(1, round(probability * n))`` pieces (n = the report's non-special tokens). Of the chosen
    tokens 80 % become ``[MASK]``, 10 % a random token and 10 % stay; ``labels`` holds their original ids and
    `IGNORE_INDEX` everywhere else. Draws on the CPU ``generator``.
    """
    token_ids, labels = tokens.token_ids.clone(), torch.full_like(tokens.token_ids, IGNORE_INDEX)
    for row, words in enumerate(tokens.word_index):
        budget, covered = max(1, round(probability * int((words >= 0).sum()))), 0
        for word in torch.randperm(int(words.max()) + 1, generator=generator).tolist():
            positions = (words == word).nonzero()[:, 0]
            if covered + len(positions) > budget:
                continue
            labels[row, positions] = token_ids[row, positions]
            covered += len(positions)
            if covered >= budget:
                break
    chosen = labels != IGNORE_INDEX
    draws = torch.rand(token_ids.shape, generator=generator)
    random_ids = torch.randint(vocabulary_size, token_ids.shape, generator=generator)
    token_ids[chosen & (draws < 0.8)] = mask_token_id
    replaced = chosen & (draws >= 0.8) & (draws < 0.9)
    token_ids[replaced] = random_ids[replaced]
    return token_ids, labels


__all__ = ["TEXT_ENCODERS", "POOLINGS", "ReportTokenizer", "SmallTextEncoder", "HuggingFaceTextEncoder",
           "build_text_encoder", "is_layer_norm", "MASK_TOKEN", "IGNORE_INDEX", "SentenceTokens", "tokenize_sentences",
           "whole_word_mask", "with_mask_token"]
