#!/usr/bin/env bash
# Adds to .gpu/ (made by ../shared/gpu/make-bundle.sh) what tests/gpu/run_device.sh needs beyond Ray:
# MLflow (the Python 3.12 wheels of mlflow==3.17.2 and its needs that the GPU image lacks, unpacked,
# without the web UI's JavaScript, as one .tar.xz of ~12 MB) and the MNIST digits. Run from the
# project root where the package registry is reachable.
set -euo pipefail
[ -d .gpu ] || { echo "bundle_extras: run ../shared/gpu/make-bundle.sh first" >&2; exit 2; }
# What the GPU image already has (../../.library/device/KINDS.md, 'Python packages already there'),
# plus what make-bundle.sh brings for Ray: not carried twice.
HAVE=" aiohappyeyeballs aiohttp annotated-doc aiosignal annotated-types anyio attrs certifi charset-normalizer click cloudpickle
 contourpy cycler filelock fonttools frozenlist fsspec grpcio h11 httpcore httpx idna jinja2 joblib kiwisolver markdown
 markdown-it-py markupsafe matplotlib mdurl msgpack multidict narwhals numpy packaging pandas pillow pip
 prometheus-client propcache protobuf psutil pyarrow pydantic pydantic-core pygments pyparsing python-dateutil pyyaml
 requests rich scikit-learn scipy setuptools six threadpoolctl typing-extensions typing-inspection urllib3 werkzeug
 wheel yarl zipp "
HAVE=" $(echo $HAVE) "   # one space between names
tmp=$(mktemp -d)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/whl" mlflow==3.17.2
mkdir "$tmp/site"
for w in "$tmp"/whl/*.whl; do
  name=$(basename "$w" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  [[ "$HAVE" == *" $name "* ]] || unzip -qo "$w" -d "$tmp/site"
done
rm -rf "$tmp/site/mlflow/server/js"
(cd "$tmp/site" && XZ_OPT=-6 tar -cJf - .) > .gpu/mlflow-slim.tar.xz
rm -rf "$tmp"
cp "$(python3 -c 'from pipeline.evaluation.datasets import mnist_path; print(mnist_path())')" .gpu/mnist_8k.npz
du -sh .gpu
