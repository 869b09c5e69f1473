"""Reference text 003's stacked ReLU LSTM (its section 4), as its authors wrote it, run on gyre.

Only the imports changed: ``tensorflow.keras.models`` / ``tensorflow.keras.layers`` became
``gyre.keras.models`` / ``gyre.keras.layers`` (the text's ``import tensorflow as tf`` is unused
and dropped), and its random arrays became real data: the text's model ends in a softmax over
``output_dim`` classes trained with categorical cross-entropy, so ``X, y`` are UCR/UEA's
JapaneseVowels training split from aeon (speakers' 12 LPC cepstrum coefficients over 7-29
frames, 9 speakers): each utterance zero-padded at its end to ``timesteps = 29`` frames, and
its speaker one-hot.

    python examples/keras/rnn_003_stacked_relu_lstm.py
"""

import numpy as np
from aeon.datasets import load_japanese_vowels

from gyre.keras.layers import LSTM, Dense
from gyre.keras.models import Sequential

# 数据: JapaneseVowels in place of np.random.rand
np.random.seed(1)
utterances, speakers = load_japanese_vowels(split="train")  # a list of (12, frames) arrays
input_dim = 12
timesteps = 29  # the longest utterance, train and test splits
output_dim = 9
num_samples = len(utterances)

X = np.zeros((num_samples, timesteps, input_dim))
for n, u in enumerate(utterances):
    X[n, :u.shape[1]] = u.T
y = np.eye(output_dim)[speakers.astype(int) - 1]

# 模型构建
model = Sequential()
model.add(LSTM(128, activation='relu', input_shape=(timesteps, input_dim), return_sequences=True))
model.add(LSTM(64, activation='relu'))
model.add(Dense(output_dim, activation='softmax'))

# 编译模型
model.compile(optimizer='adam', loss='categorical_crossentropy', metrics=['accuracy'])

# 训练模型
model.fit(X, y, epochs=10, batch_size=32)
