"""Tiny real models for tests and ``alignd demo --quick``.

They are built from configs, not downloaded: a byte-level BPE tokenizer trained on the small
English corpus below, a WordPiece tokenizer counted from it, a 2-layer Llama causal LM and a
2-layer BERT scalar classifier. Both are saved with ``save_pretrained`` (safetensors), so their
users go through the same loading path as for real checkpoints. Everything is seeded: two
builds give identical files. A build takes well under a second.

The chat tokenizer mirrors SmolLM2's: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` are
ids 0, 1, 2; ``<|im_end|>`` is eos and pad; the chat template is SmolLM2's ChatML template.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

logger = logging.getLogger(__name__)

SEED = 0
MAX_POSITIONS = 512
CHAT_VOCAB_SIZE = 480
WORDPIECE_VOCAB_SIZE = 400

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2-135M-Instruct's chat template, character for character."""

CORPUS = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
    "The system sets the rules, the user asks, and the assistant answers.",
    "What is the capital of France? The capital of France is Paris.",
    "How many legs does a spider have? A spider has eight legs.",
    "Please write a short poem about the sea and the wind.",
    "The quick brown fox jumps over the lazy dog.",
    "Two plus two is four, and three times three is nine.",
    "Explain why the sky is blue in one sentence.",
    "Sunlight is scattered by the air, and blue light is scattered the most.",
    "Can you help me plan a trip to the mountains next week?",
    "Sure! Pack warm clothes, water, a map and good boots.",
    "Reinforcement learning from human feedback aligns a policy with a reward model.",
    "The reward model scores each answer; the policy learns to earn higher rewards.",
    "A reference model keeps the policy close to where it started.",
    "Thank you very much, that was really helpful.",
    "I am sorry, but I cannot help with that request.",
    "Once upon a time there was a little robot who loved to read books.",
    "Every morning she walked to the library and borrowed a new story.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The train leaves at nine o'clock and arrives before noon.",
    "Do you like cats or dogs? I like both, but cats are quieter.",
    "Summarize the following text in three words.",
    "Translate 'good morning' into French: bonjour.",
    "The answer is yes, because the numbers add up to ten.",
    "Write a function that returns the sum of a list of numbers.",
    "def add(a, b):\n    return a + b",
    "Hello! How are you today? I am fine, thanks for asking.",
    "Good answers are short, correct, kind and clear.",
    "Bad answers are long, wrong, rude or confusing.",
    "The weather today is sunny with a light breeze from the west.",
    "Green, red, yellow and blue are colours of the rainbow.",
    "My favourite fruit is an apple; my brother prefers bananas.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Questions end with a question mark, and sentences end with a full stop.",
    "Let's think step by step before we give the final answer.",
    "The model generated a completion, and the scorer returned a reward.",
)
"""Bundled training text: varied enough that ordinary English takes few tokens."""


@dataclass(frozen=True)
class TinyModels:
    """Paths of the tiny models built by :func:`build_tiny_models`.

    Attributes:
        causal_lm: directory of the Llama causal LM (with the chat tokenizer).
        classifier: directory of the BERT sequence classifier, ``num_labels=1``.
    """

    causal_lm: Path
    classifier: Path


def build_chat_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE chat tokenizer (vocabulary of :data:`CHAT_VOCAB_SIZE`).

    Returns:
        A tokenizer with SmolLM2's special tokens and chat template; it adds no special tokens
        to plain text, like SmolLM2's.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=CHAT_VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def build_wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """Build a lowercasing BERT-style WordPiece tokenizer: ``[CLS] text [SEP]`` (a pair
    ``[CLS] a [SEP] b [SEP]`` with token types 0 then 1), no eos.

    The vocabulary is the special tokens, every character of the corpus (alone and as a
    ``##`` continuation) and then its most frequent words, so any text made of those characters
    tokenizes without ``[UNK]``. It is counted directly rather than trained, because the
    WordPiece trainer numbers its vocabulary in hash order and would not be reproducible.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for line in CORPUS:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = sorted({c for w in words for c in w})
    vocab_list = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    frequent = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab_list += frequent[: WORDPIECE_VOCAB_SIZE - len(vocab_list)]

    tok = Tokenizer(
        models.WordPiece(vocab={t: i for i, t in enumerate(vocab_list)}, unk_token="[UNK]")
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_POSITIONS,
        # As BERT's own tokenizer: a text pair's second segment has token type 1.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def build_tiny_causal_lm(directory: Path | str) -> Path:
    """Save a seeded 2-layer Llama (hidden 64, one head of 64) and the chat tokenizer.

    A head size of 64 is one vLLM's CPU attention kernels support, so the same tiny model
    serves the ``hf`` and ``vllm`` engines.

    Args:
        directory: where to write; created if missing, files overwritten.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`.
    """
    directory = Path(directory)
    tokenizer = build_chat_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    logger.debug("built tiny causal LM in %s", directory)
    return directory


def build_tiny_classifier(directory: Path | str) -> Path:
    """Save a seeded 2-layer BERT scalar classifier (``num_labels=1``) and its tokenizer.

    Args:
        directory: where to write; created if missing, files overwritten.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`.
    """
    directory = Path(directory)
    tokenizer = build_wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    logger.debug("built tiny classifier in %s", directory)
    return directory


def build_tiny_models(root: Path | str) -> TinyModels:
    """Build both tiny models under ``root`` (``tiny-causal-lm/``, ``tiny-classifier/``)."""
    root = Path(root)
    return TinyModels(
        causal_lm=build_tiny_causal_lm(root / "tiny-causal-lm"),
        classifier=build_tiny_classifier(root / "tiny-classifier"),
    )
