#!/usr/bin/env bash
# Builds Colloquy's container images from docker/Dockerfile (the targets the overlays deploy):
#   ${IMAGE_REGISTRY}/colloquy-serving:${IMAGE_TAG}          target serving
#   ${IMAGE_REGISTRY}/colloquy-generation-cuda:${IMAGE_TAG}  target generation-cuda
#   ${IMAGE_REGISTRY}/colloquy-training:${IMAGE_TAG}         target training
# IMAGE_TAG defaults to pyproject.toml's version (the tag the overlays pin). PUSH=1 pushes.
# Without a working container engine it says so and exits 0; REQUIRE_IMAGES=1 makes that an error.
set -euo pipefail
cd "$(dirname "$0")/.."

registry=${IMAGE_REGISTRY:-ghcr.io/colloquy}
tag=${IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)}
docker=${DOCKER:-docker}

if ! command -v "$docker" >/dev/null 2>&1 || ! "$docker" info >/dev/null 2>&1; then
  echo "images: no working container engine ($docker info failed); nothing built" >&2
  [ -n "${REQUIRE_IMAGES:-}" ] && exit 1
  exit 0
fi

push=()
[ -n "${PUSH:-}" ] && push=(--push)
for target in serving generation-cuda training; do
  image="$registry/colloquy-$target:$tag"
  echo "images: building $image (target $target)"
  DOCKER_BUILDKIT=1 "$docker" buildx build -f docker/Dockerfile --target "$target" -t "$image" \
    "${push[@]}" ${IMAGE_PLATFORM:+--platform "$IMAGE_PLATFORM"} .
done
