"""ElmoEmbedder.embed_file: AllenNLP's `allennlp elmo` hdf5 layout.

One float32 dataset per input line, named by the line's index ("0", "1", ...) or, with use_sentence_keys, by
the sentence itself: (n_layers + 1, T, 2P) with output_format "all", (T, 2P) with "top" (the last layer) or
"average" (the mean of the layers); and, unless forget_sentences or use_sentence_keys, a dataset
"sentence_to_index" holding one string, the JSON object {sentence: index}.
"""
from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("all", "top", "average")


def _read_lines(input_file) -> list[str]:
    if hasattr(input_file, "read"):
        return [line.strip() for line in input_file]
    path = Path(input_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable UTF-8 text file ({err})") from err


def embed_file(embedder, input_file, output_file_path, output_format="all", batch_size=None,
               forget_sentences=False, use_sentence_keys=False, progress=True) -> None:
    import h5py
    import numpy as np
    from tqdm import tqdm

    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    sentences = _read_lines(input_file)
    blank = [i for i, line in enumerate(sentences) if not line]
    if blank:
        raise ValueError(f"{getattr(input_file, 'name', input_file)}: empty lines at indexes {blank} "
                         "(AllenNLP's elmo command rejects them too); remove them")
    keys = sentences if use_sentence_keys else [str(i) for i in range(len(sentences))]
    if use_sentence_keys and len(set(keys)) != len(keys):
        raise ValueError(f"{input_file}: repeated sentences cannot be keys; drop use_sentence_keys")
    vectors = embedder.embed_sentences((s.split() for s in sentences), batch_size)
    with h5py.File(output_file_path, "w") as fout:
        for key, embedding in tqdm(zip(keys, vectors), total=len(keys), desc="elmo", unit="sentence",
                                   disable=not progress):
            if output_format == "top":
                embedding = embedding[-1]
            elif output_format == "average":
                embedding = np.average(embedding, axis=0)
            fout.create_dataset(key, embedding.shape, dtype="float32", data=embedding)
        if not forget_sentences and not use_sentence_keys:
            index = fout.create_dataset("sentence_to_index", (1,), dtype=h5py.special_dtype(vlen=str))
            index[0] = json.dumps({s: k for s, k in zip(sentences, keys)})
