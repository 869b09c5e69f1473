"""Reference text 001's binary classifier (its section 4), as its authors wrote it, run on gyre.

Only the imports changed: ``tensorflow.keras.models`` / ``tensorflow.keras.layers`` became
``gyre.keras.models`` / ``gyre.keras.layers`` (the text's ``import tensorflow as tf`` is unused
and dropped). The text leaves ``X_train, y_train, X_test, y_test`` to the reader; here they are
UCR's ItalyPowerDemand with its official split, from aeon (24 hourly electricity values a day;
class '1' is October-March, '2' April-September, read as 0 and 1). ``validation_data`` is the
text's: Keras only reports the test split's loss and accuracy after each epoch.

    python examples/keras/rnn_001_binary_classifier.py
"""

import numpy as np
from aeon.datasets import load_italy_power_demand

from gyre.keras.layers import LSTM, Dense, Dropout
from gyre.keras.models import Sequential

# the reader's data: ItalyPowerDemand, (n, dims, length) -> Keras's (n, timesteps, features)
X_train, y_train = load_italy_power_demand(split="train")
X_test, y_test = load_italy_power_demand(split="test")
X_train, X_test = np.transpose(X_train, (0, 2, 1)), np.transpose(X_test, (0, 2, 1))
y_train, y_test = (y_train == "2").astype("float32"), (y_test == "2").astype("float32")

# 创建循环层神经网络模型
model = Sequential()
model.add(LSTM(128, input_shape=(X_train.shape[1], X_train.shape[2])))
model.add(Dense(64, activation='relu'))
model.add(Dropout(0.5))
model.add(Dense(1, activation='sigmoid'))

# 编译模型
model.compile(loss='binary_crossentropy', optimizer='adam', metrics=['accuracy'])

# 训练模型
model.fit(X_train, y_train, epochs=10, batch_size=32, validation_data=(X_test, y_test))
