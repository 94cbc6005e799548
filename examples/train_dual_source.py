"""Train the dual-source (Sentinel-2 10 m + 20 m) fully-convolutional classifier.

The model, dataset and training calls are those of the OTBTF tutorial's
``DualSrcFCNNModel`` (inputs ``input_10m`` 16×16×4 and ``input_20m`` 8×8×6, one
class per sample), written against terrapatch's OTBTF-compatible API. Example::

    python examples/train_dual_source.py \
        --train_10m a_img_10m.tif --train_20m a_img_20m.tif --train_labels a_labels.tif \
        --valid_10m b_img_10m.tif --valid_20m b_img_20m.tif --valid_labels b_labels.tif \
        --model model2_dualsrc.keras --log_dir logs/model2_dualsrc --epochs 20

``--synthetic N`` trains on N generated samples instead (a quick demo and smoke test:
the class of each sample is encoded in its pixel values, so the metrics improve).
Convert the resulting ``.keras`` file for serving with ``examples/savedmodel.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

import terrapatch as otbtf
from terrapatch.metrics import FScore
from terrapatch.patches import write_patches_image

class_nb = 6  # number of classes
inp1_key = "input_10m"  # model input for 10m bands
inp2_key = "input_20m"  # model input for 20m bands
tgt_key = "estimated"  # model target


def dataset_preprocessing_fn(sample):
    """Rename the patches to the model inputs; one-hot encode the labels as the target."""
    return {
        inp1_key: sample["img_10m"],
        inp2_key: sample["img_20m"],
        tgt_key: otbtf.ops.one_hot(labels=sample["labels"], nb_classes=class_nb),
    }


def create_dataset(img_10m, img_20m, labels, batch_size=8, use_streaming=False, seed=None):
    """Return a tf.data dataset of ((input_10m, input_20m), estimated) batches."""
    otbtf_dataset = otbtf.DatasetFromPatchesImages(
        filenames_dict={"img_10m": img_10m, "img_20m": img_20m, "labels": labels},
        use_streaming=use_streaming,
    )
    return otbtf_dataset.get_tf_dataset(
        batch_size=batch_size,
        preprocessing_fn=dataset_preprocessing_fn,
        targets_keys=[tgt_key],
        seed=seed,
    )


def conv(inp, depth, kernel_size, name, activation="relu"):
    """Valid (unpadded) convolution, stride 1."""
    conv_op = keras.layers.Conv2D(
        filters=depth,
        kernel_size=kernel_size,
        strides=1,
        activation=activation,
        padding="valid",
        name=name,
    )
    return conv_op(inp)


class DualSrcFCNNModel(otbtf.ModelBase):
    """Two branches (10 m and 20 m) merged at 20 m spacing, one class per 20 m pixel."""

    def normalize_inputs(self, inputs):
        """Scale both inputs by 1e-4 (Sentinel-2 reflectances)."""
        return {
            key: keras.ops.cast(inputs[key], "float32") * 1e-4
            for key in [inp1_key, inp2_key]
        }

    def get_outputs(self, normalized_inputs):
        """Build the network: softmax scores, class ids and features."""
        pool = keras.layers.MaxPool2D(pool_size=(2, 2))

        # The 10m branch
        inp1 = normalized_inputs[inp1_key]  # 16x16x4
        net1 = conv(inp1, 16, 5, "conv11")  # 12x12x16
        net1 = conv(net1, 16, 3, "conv12")  # 10x10x16
        net1 = conv(net1, 16, 3, "conv13")  # 8x8x16
        net1 = conv(net1, 32, 3, "conv14")  # 6x6x32
        net1 = conv(net1, 32, 3, "conv15")  # 4x4x32
        net1 = pool(net1)  # 2x2x32
        net1 = conv(net1, 32, 2, "feats1")  # 1x1x32

        # The 20m branch
        inp2 = normalized_inputs[inp2_key]  # 8x8x6
        net2 = conv(inp2, 32, 3, "conv21")  # 6x6x32
        net2 = conv(net2, 32, 3, "conv22")  # 4x4x32
        net2 = conv(net2, 32, 3, "conv23")  # 2x2x32
        net2 = conv(net2, 32, 2, "feats2")  # 1x1x32

        # Merge features
        net = keras.layers.Concatenate(name="feats", axis=-1)([net1, net2])

        # Classifier
        estim = conv(net, class_nb, 1, "softmax_layer", activation="softmax")
        argmax_op = otbtf.layers.Argmax()

        return {
            tgt_key: estim,
            "estimated_labels": argmax_op(estim),  # additional output: class id
            "features": net,  # additional output: features
        }


def seed_metrics():
    """Per-class precision, recall and F1-score, as in the tutorial."""
    metrics = [
        cls(class_id=class_id)
        for class_id in range(class_nb)
        for cls in [keras.metrics.Precision, keras.metrics.Recall]
    ]
    metrics += [
        FScore(class_id=class_id, name=f"fscore_cls{class_id}")
        for class_id in range(class_nb)
    ]
    return metrics


def write_synthetic_patches(directory, prefix, n, seed=0):
    """Write 10 m, 20 m and labels patches images whose class shows in the pixel values.

    Returns the three file names. Class ``c`` raises band ``c % 4`` of the 10 m patch
    and band ``c`` of the 20 m patch by a fraction of the noise level, so the two
    sources are needed and the model learns it over a few epochs.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, class_nb, n)
    img_10m = rng.normal(2000, 400, (n, 16, 16, 4))
    img_20m = rng.normal(2000, 400, (n, 8, 8, 6))
    img_10m[np.arange(n), :, :, labels % 4] += 250
    img_20m[np.arange(n), :, :, labels] += 250
    names = []
    for name, array, psz, dtype in (
        ("img_10m", img_10m, 16, "uint16"),
        ("img_20m", img_20m, 8, "uint16"),
        ("labels", labels.reshape(n, 1, 1, 1), 1, "uint8"),
    ):
        path = Path(directory) / f"{prefix}{name}.tif"
        write_patches_image(path, [array], n_patches=n, patch_size_x=psz, patch_size_y=psz,
                            bands=array.shape[-1], dtype=dtype)
        names.append(str(path))
    return names


def parse_args(argv):
    """Parse the command line."""
    parser = argparse.ArgumentParser(description="Train the dual-source CNN model")
    parser.add_argument("--model", required=True, help="model path (.keras file)")
    parser.add_argument("--log_dir", required=True, help="logs directory (TensorBoard)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=0.0002)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train_10m", nargs="+", help="training 10 m patches images")
    parser.add_argument("--train_20m", nargs="+", help="training 20 m patches images")
    parser.add_argument("--train_labels", nargs="+", help="training labels images")
    parser.add_argument("--valid_10m", nargs="+", help="validation 10 m patches images")
    parser.add_argument("--valid_20m", nargs="+", help="validation 20 m patches images")
    parser.add_argument("--valid_labels", nargs="+", help="validation labels images")
    parser.add_argument("--use_streaming", action="store_true",
                        help="read patches lazily from disk instead of loading them")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="train on N generated samples (validation: N/4) instead of files")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (weights and sample order)")
    parser.add_argument("--class_nb", type=int, default=class_nb, help="number of classes")
    params = parser.parse_args(argv)
    if not params.synthetic:
        for group in ("train", "valid"):
            missing = [f"--{group}_{k}" for k in ("10m", "20m", "labels")
                       if not getattr(params, f"{group}_{k}")]
            if missing:
                parser.error(f"missing {', '.join(missing)} (or use --synthetic N)")
    return params


def main(argv=None):
    """Train the model; the best model (lowest validation loss) is saved to --model."""
    global class_nb
    params = parse_args(argv)
    class_nb = params.class_nb
    if params.seed is not None:
        keras.utils.set_random_seed(params.seed)  # weights, dropout and sample order
    with tempfile.TemporaryDirectory(prefix="terrapatch-synthetic-") as tmp:
        if params.synthetic:
            train_files = write_synthetic_patches(tmp, "a_", params.synthetic, seed=1)
            valid_files = write_synthetic_patches(tmp, "b_", max(params.synthetic // 4, 8),
                                                  seed=2)
        else:
            train_files = [params.train_10m, params.train_20m, params.train_labels]
            valid_files = [params.valid_10m, params.valid_20m, params.valid_labels]

        ds_train = create_dataset(*train_files, batch_size=params.batch_size,
                                  use_streaming=params.use_streaming, seed=params.seed)
        ds_train = ds_train.shuffle(buffer_size=100)
        ds_valid = create_dataset(*valid_files, batch_size=params.batch_size,
                                  use_streaming=params.use_streaming, seed=params.seed)

        model = DualSrcFCNNModel(dataset_element_spec=ds_train.element_spec)
        model.compile(
            loss={tgt_key: keras.losses.CategoricalCrossentropy()},
            optimizer=keras.optimizers.Adam(params.learning_rate),
            metrics={tgt_key: seed_metrics()},
        )
        model.summary()

        save_callback = keras.callbacks.ModelCheckpoint(
            params.model,
            save_best_only=True,  # save only the best models
            monitor="val_loss",  # metric or loss to monitor
            mode="min",  # when a new min is reached
            verbose=2,  # log something when saving
        )
        tb_callback = keras.callbacks.TensorBoard(log_dir=params.log_dir)
        start = time.perf_counter()
        model.fit(
            ds_train,
            epochs=params.epochs,
            validation_data=ds_valid,
            callbacks=[save_callback, tb_callback],
            verbose=2,
        )
        print(f"trained {params.epochs} epoch(s) in {time.perf_counter() - start:.1f} s; "
              f"best model saved to {params.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
