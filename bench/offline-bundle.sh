#!/usr/bin/env bash
# The offline bundle bench/gpu.sh unpacks on the air-gapped CUDA host, whose Python (3.12, x86_64)
# already has torch, triton, transformers, peft, accelerate, numpy, pandas and pyarrow, but not the
# rest of this project's stack. A copy of ../shared/tools/offline-bundle.sh with the bench's peers
# added: TRL (the `trl` arm of bench/train.py) and what it needs that the host lacks (datasets and
# its dill, multiprocess, xxhash). Output: OUTDIR/site.tar.xz (a site-packages tree, trimmed) under 60 MiB.
#
#   bench/offline-bundle.sh .gpu-bundle            # ray + deepspeed + bitsandbytes + liger + pydantic + trl
#   NO_RAY=1 bench/offline-bundle.sh OUTDIR        # the same without ray (bench.train's arms run without it)
#   PYVER=3.11 bench/offline-bundle.sh OUTDIR      # for another Python (to try the bundle on this machine)
#
# On the host:  mkdir -p /tmp/site && tar -xJf OUTDIR/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
# (bench/gpu.sh does this, and takes from /tmp/site/_fallback what the host lacks)
# Then check: python3 -c "import ray, deepspeed, bitsandbytes, liger_kernel, pydantic, trl"
# A module still missing there: add it to PKGS below (with --no-deps nothing is pulled in by itself).
# Unsloth is not in it: unsloth 2026.10 needs trl<=1.15 and datasets<5 (this bundle's trl arm runs
# TRL 1.16), torchvision built for the host's torch and CUDA, torchao and cut_cross_entropy; see
# bench/RESULTS.md.
set -euo pipefail
out=${1:?usage: offline-bundle.sh OUTDIR}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--python-version "${PYVER:-3.12}" --implementation cp --only-binary=:all: --platform any)
for p in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  plat+=(--platform "${p}_x86_64")
done
PKGS=(bitsandbytes==0.50.2 liger-kernel==0.8.5 hjson
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection 'typing-extensions>=4.16')
# the trl arm: TRL and datasets (pure Python), datasets' dill, multiprocess, xxhash and fsspec (datasets caps it)
PKGS+=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0)
[[ -n ${NO_RAY:-} ]] || PKGS+=(ray==2.60.0 jsonschema jsonschema-specifications referencing rpds-py tensorboardX)
python3 -m pip install -q --no-compile --no-deps --target "$work/site" "${plat[@]}" "${PKGS[@]}"
# Fallbacks: what ray, deepspeed and datasets import that a host image may or may not have. They
# go to _fallback/; bench/gpu.sh moves each into the tree only where the host lacks the module, so
# a host's own version is never shadowed.
FALLBACKS=(einops==0.8.2 py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2 protobuf==7.36.2 requests==2.34.2
           urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 idna==3.20)
python3 -m pip install -q --no-compile --no-deps --target "$work/site/_fallback" "${plat[@]}" "${FALLBACKS[@]}"
# deepspeed ships only a source archive; its build needs torch importable here (ops are built just in time there)
python3 -c 'import torch' 2>/dev/null || { echo "offline-bundle: torch must be importable here to build deepspeed" >&2; exit 1; }
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" deepspeed==0.19.8
python3 -m pip install -q --no-compile --no-deps --target "$work/site" "$work"/wheels/deepspeed-*.whl
# trim what a CUDA 13 host never loads
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
rm -rf "$work/site/bin" "$work/site"/ray/{jars,rllib,serve,llm} 2>/dev/null || true
tar -cJf "$out/site.tar.xz" -C "$work/site" .
size=$(stat -c %s "$out/site.tar.xz")
echo "offline-bundle: $out/site.tar.xz $((size / 1048576)) MiB"
(( size < 60 * 1048576 )) || { echo "offline-bundle: over 60 MiB; trim more" >&2; exit 1; }
