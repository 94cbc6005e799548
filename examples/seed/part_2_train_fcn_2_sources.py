"""Step 2: train the dual-source model (examples/train_dual_source.py) on the extracted patches.

Usage: python part_2_train_fcn_2_sources.py [--epochs N]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paths import CLASS_NB, logs, model_keras, prefix_a, prefix_b

import train_dual_source

argv = ["--model", model_keras, "--log_dir", logs, "--class_nb", str(CLASS_NB), "--seed", "0",
        "--train_10m", prefix_a + "img_10m_2src.tif", "--train_20m", prefix_a + "img_20m_2src.tif",
        "--train_labels", prefix_a + "labels_2src.tif",
        "--valid_10m", prefix_b + "img_10m_2src.tif", "--valid_20m", prefix_b + "img_20m_2src.tif",
        "--valid_labels", prefix_b + "labels_2src.tif", *sys.argv[1:]]
sys.exit(train_dual_source.main(argv))
