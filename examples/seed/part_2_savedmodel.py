"""Step 3: convert the trained .keras model to a TensorFlow SavedModel."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import savedmodel  # noqa: E402

from paths import model_keras, savedmodel as savedmodel_dir  # noqa: E402

sys.exit(savedmodel.main(["--model", model_keras, "--savedmodel", savedmodel_dir]))
