"""Runs a .tflite model with TensorFlow Lite Micro's interpreter (the
`tflite-micro` PyPI package, TFLM's reference kernels) over a corpus of int8
inputs, for the bit-exactness test in tests/tests/tflite.rs.

usage: python3 tflm_reference.py MODEL.tflite INPUTS.bin OUTPUTS.bin N_IN

INPUTS.bin holds the input rows back to back, N_IN int8 values each; the
int8 output rows are written to OUTPUTS.bin the same way. A JSON report of
the tensors' quantization as TFLM read it goes to stdout.
"""

import json
import sys

import numpy as np
from tflite_micro.python.tflite_micro import runtime


def main():
    model_path, inputs_path, outputs_path, n_in = sys.argv[1:5]
    n_in = int(n_in)
    with open(model_path, "rb") as f:
        model = f.read()
    interpreter = runtime.Interpreter.from_bytes(model)
    inputs = np.fromfile(inputs_path, dtype=np.int8)
    if n_in <= 0 or inputs.size % n_in != 0:
        raise SystemExit(f"{inputs_path}: {inputs.size} bytes is not a whole number of {n_in}-value rows")
    rows = inputs.reshape(-1, n_in)
    outputs = []
    for row in rows:
        interpreter.set_input(row.reshape(1, n_in), 0)
        interpreter.invoke()
        out = interpreter.get_output(0)
        if out.dtype != np.int8:
            raise SystemExit(f"output tensor is {out.dtype}, not int8")
        outputs.append(out.reshape(-1).copy())
    np.concatenate(outputs).astype(np.int8).tofile(outputs_path)

    def details(d):
        q = d["quantization_parameters"]
        return {
            "shape": [int(x) for x in d["shape"]],
            "dtype": str(np.dtype(d["dtype"])),
            "scales": [float(x) for x in q["scales"]],
            "zero_points": [int(x) for x in q["zero_points"]],
        }

    print(json.dumps({
        "rows": int(rows.shape[0]),
        "input": details(interpreter.get_input_details(0)),
        "output": details(interpreter.get_output_details(0)),
    }))


if __name__ == "__main__":
    main()
