"""Text for recurrent models: tokenisers (characters, words, sentencepiece subwords) that are
fitted on a training split and saved with a run, numericalisation into a padded batch plus
``lengths`` (what gyre's layers take as ``lengths=``; no packing), and token embeddings that a
language model's output layer may share.

Every tokeniser reserves the same four ids: ``PAD`` 0, ``UNK`` 1, ``BOS`` 2, ``EOS`` 3, so a
padded batch and an embedding's ``padding_idx`` agree whatever the tokeniser.

    tok = text.fit_tokenizer("sentencepiece", train_texts, vocab_size=4000)
    ids, lengths = text.pad_batch([tok.encode(t) for t in batch_texts])
    state = tok.state()                 # goes into a checkpoint's extra
    tok = text.tokenizer_from_state(state)
"""

from .embedding import NgramBag, TiedOutput, TokenEmbedding
from .tokenizers import (
           BOS,
           EOS,
           PAD,
           SPECIALS,
           TOKENIZERS,
           UNK,
           CharTokenizer,
           SentencePieceTokenizer,
           Tokenizer,
           WordTokenizer,
           fit_tokenizer,
           pad_batch,
           tokenizer_from_state,
)

__all__ = ["PAD", "UNK", "BOS", "EOS", "SPECIALS", "Tokenizer", "CharTokenizer", "WordTokenizer",
           "SentencePieceTokenizer", "TOKENIZERS", "fit_tokenizer", "tokenizer_from_state",
           "pad_batch", "TokenEmbedding", "TiedOutput", "NgramBag"]
