"""Treescope under the names penzai's ``pz.ts`` gives it: ``from pz_flax.pz import ts``.

The notebook entry points (`display`, `register_as_default`,
`basic_interactive_setup`) are pz_flax's wrappers from
`pz_flax.core.treescope_setup`; everything else is treescope's own object.
``pz.ts.render_array(named_array)`` draws a named array with its axis names.
"""

from treescope import ArrayAutovisualizer
from treescope import Autovisualizer
from treescope import ChildAutovisualizer
from treescope import IPythonVisualization
from treescope import active_autovisualizer
from treescope import active_expansion_strategy
from treescope import active_renderer
from treescope import default_diverging_colormap
from treescope import default_magic_autovisualizer
from treescope import default_sequential_colormap
from treescope import integer_digitbox
from treescope import register_autovisualize_magic
from treescope import register_context_manager_magic
from treescope import render_array
from treescope import render_array_sharding
from treescope import render_to_html
from treescope import render_to_text
from treescope import using_expansion_strategy
from treescope.figures import bolded
from treescope.figures import indented
from treescope.figures import inline
from treescope.figures import styled
from treescope.figures import text_on_color
from treescope.figures import with_color
from treescope.figures import with_font_size

from pz_flax.core.treescope_setup import basic_interactive_setup
from pz_flax.core.treescope_setup import display
from pz_flax.core.treescope_setup import register_as_default

vocab_autovisualizer = ArrayAutovisualizer.for_tokenizer

__all__ = [
    "ArrayAutovisualizer",
    "Autovisualizer",
    "ChildAutovisualizer",
    "IPythonVisualization",
    "active_autovisualizer",
    "active_expansion_strategy",
    "active_renderer",
    "basic_interactive_setup",
    "bolded",
    "default_diverging_colormap",
    "default_magic_autovisualizer",
    "default_sequential_colormap",
    "display",
    "indented",
    "inline",
    "integer_digitbox",
    "register_as_default",
    "register_autovisualize_magic",
    "register_context_manager_magic",
    "render_array",
    "render_array_sharding",
    "render_to_html",
    "render_to_text",
    "styled",
    "text_on_color",
    "using_expansion_strategy",
    "vocab_autovisualizer",
    "with_color",
    "with_font_size",
]
