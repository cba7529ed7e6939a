"""ONNX export with adaptive depth kept: one ``model.onnx`` that runs the whole solve.

Split by job:

- :mod:`~models.onnx.runtime`: the file's interface and metadata, the freshness check, running
  it (torch-free: all the onnxruntime backend imports);
- :mod:`~models.onnx.plan`: what to export, asked of the family (its solve parts and solvers);
- :mod:`~models.onnx.parts`: torch -> ONNX for each part; :mod:`~models.onnx.graph`: writing
  graphs by hand; :mod:`~models.onnx.loops`: the solver loops; :mod:`~models.onnx.build`: the
  whole-solve model;
- :mod:`~models.onnx.verify`: parity with torch; :mod:`~models.onnx.export`: ``fpn-export``'s
  work, and :mod:`~models.onnx.cli` the command.

This package's ``__init__`` imports nothing, so importing the runtime module does not load torch.
"""
