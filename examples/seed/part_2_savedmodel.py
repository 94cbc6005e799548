"""Step 3: convert the trained .keras model to a TensorFlow SavedModel."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paths import model_keras
from paths import savedmodel as savedmodel_dir

import savedmodel

# The seed's own options (--model, --savedmodel) override the defaults from paths.py.
sys.exit(savedmodel.main(["--model", model_keras, "--savedmodel", savedmodel_dir,
                          *sys.argv[1:]]))
