#!/bin/sh
# Re-copy the served configs into the kustomize tree after editing configs/.
# kustomize only reads files under a kustomization's folder, so the ConfigMaps are built from
# these copies; tests/test_deploy.py fails when a copy differs from its source in configs/.
set -eu
cd "$(dirname "$0")/../.."
cp configs/default.yaml deploy/k8s/base/config/dgserve.yaml
cp configs/diffusiongemma-26b.yaml deploy/k8s/overlays/gpu/config/dgserve.yaml
