"""The Keras architectures. Every model takes uint8 ``[N, 28, 28]`` and scales inside the graph.

Scaling in the model (``Rescaling(1/255)``) means the exported serving signature takes raw
bytes, the server passes them straight through, and training, evaluation and serving all see
exactly the same preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import layers, regularizers

from mnist_client.contract import IMAGE_SHAPE, INPUT_NAME, NUM_CLASSES, OUTPUT_NAME


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture is built and trained by default."""

    build: Callable[[int, int], keras.Model]  # (steps_per_epoch, epochs) -> compiled model
    epochs: int
    batch_size: int
    patience: int  # early-stopping patience, in epochs
    description: str


def _inputs() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    inputs = keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name=INPUT_NAME)
    scaled = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    return inputs, scaled


def _steps_per_execution() -> int:
    """64 steps per call into TensorFlow instead of one for the small MLP: the same updates
    (model.tflite came out byte-identical), training in 35 s instead of 77 s on 2 cores, where
    the per-step Python overhead outweighed its arithmetic. One under a tf.distribute strategy,
    where Keras 3's multi-step loop fails ("You must feed a value for placeholder tensor")."""
    import tensorflow as tf

    return 1 if tf.distribute.has_strategy() else 64


def build_mlp(steps_per_epoch: int, epochs: int) -> keras.Model:
    """The TF2 tutorial model: Flatten, Dense(128, relu), Dropout(0.2), Dense(10, softmax); Adam."""
    del steps_per_epoch, epochs
    inputs, x = _inputs()
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name=OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs, name="mlp")
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=_steps_per_execution(),
    )
    return model


def build_mlp50(steps_per_epoch: int, epochs: int) -> keras.Model:
    """The classic from-scratch perceptron: one sigmoid layer of 50 units, L2, mini-batch SGD.

    The learning rate decays as ``lr0 / (1 + k * epoch)`` like the original's ``decrease_const``.
    """
    del epochs
    l2 = regularizers.L2(1e-4)
    inputs, x = _inputs()
    x = layers.Flatten()(x)
    x = layers.Dense(50, activation="sigmoid", kernel_regularizer=l2)(x)
    outputs = layers.Dense(
        NUM_CLASSES, activation="softmax", kernel_regularizer=l2, name=OUTPUT_NAME
    )(x)
    model = keras.Model(inputs, outputs, name="mlp50")
    schedule = keras.optimizers.schedules.InverseTimeDecay(
        initial_learning_rate=0.5, decay_steps=max(1, steps_per_epoch), decay_rate=0.1
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=schedule, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def build_cnn(steps_per_epoch: int, epochs: int) -> keras.Model:
    """The production model: a LeNet-5-style CNN (two 5x5 conv + pool stages), dropout,
    augmentation, Adam with cosine decay. ~99.5% test accuracy in 15 epochs, ~8 minutes on
    2 CPU cores.

    Sized for the CPU: 'valid' 5x5 convolutions shrink the maps early (3.9 M multiply-adds
    per image), and no batch norm (it cost 60% more time per epoch here for no accuracy on
    this budget). Augmentation (small rotations, shifts, zooms; never flips, a flipped digit
    is another symbol) runs only in training.
    """
    inputs, x = _inputs()
    x = layers.Reshape((*IMAGE_SHAPE, 1))(x)
    x = layers.RandomRotation(0.03, fill_mode="constant", name="aug_rotate")(x)
    x = layers.RandomTranslation(0.08, 0.08, fill_mode="constant", name="aug_shift")(x)
    x = layers.RandomZoom(0.08, fill_mode="constant", name="aug_zoom")(x)
    for filters in (32, 64):
        x = layers.Conv2D(filters, 5, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name=OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs, name="cnn")
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=2e-3, decay_steps=max(1, steps_per_epoch * epochs), alpha=0.01
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


ARCHITECTURES: dict[str, ArchSpec] = {
    "mlp": ArchSpec(build_mlp, epochs=10, batch_size=32, patience=3, description="tutorial MLP"),
    "mlp50": ArchSpec(
        build_mlp50, epochs=30, batch_size=64, patience=4, description="50-unit SGD perceptron"
    ),
    "cnn": ArchSpec(build_cnn, epochs=15, batch_size=128, patience=4, description="CNN"),
}
