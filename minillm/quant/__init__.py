"""Quantization that wraps any `nn.Module` without the models knowing: chapters 11 (int8), 12 (NF4)
and 15 (8-bit optimizers). The Triton kernels of chapter 13 live in `minillm.quant.kernels`, imported on demand
so that chapters 11-12 never load Triton."""

from minillm.quant.blockwise import create_dynamic_map, dequantize_blockwise, quantize_blockwise
from minillm.quant.int8 import (Int8Linear, absmax_dequantize, absmax_quantize, int8_linear_matmul, int8_mm_dequant,
                                int8_vectorwise_dequant, int8_vectorwise_quant, zeropoint_dequantize,
                                zeropoint_quantize)
from minillm.quant.nf4 import (QuantState, bits_per_parameter, create_fp4_code, create_nf4_code, dequantize_4bit,
                               dequantize_absmax, get_4bit_code, pack_nibbles, quantize_4bit, unpack_nibbles)
from minillm.quant.linear4bit import Int4Linear, quantize_model
from minillm.quant.optim import Adam8bit, AdamW8bit, Lion8bit, state_bytes
