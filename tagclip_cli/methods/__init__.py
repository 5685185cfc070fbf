"""Methods as plug-ins: TagCLIP (tags) and CLS-SEG, MaskCLIP, SCLIP, ClearCLIP, NACLIP (masks),
each a module of its own behind one protocol (`base.Method`) and one registry (`registry`).

    import tagclip_cli.methods as methods
    methods.names("masks")                     # ('clses', 'maskclip', 'sclip', 'clearclip', 'naclip', ...)
    method = methods.get("maskclip")           # its facts: kind, needs_tags, needs_rgb, options, settings
    config = methods.configure("maskclip", "coco", key_smoothing=True)   # frozen, the published values
    segments = method.build(backbone, vocab, config, quirks=Quirks())
    outputs = segments.segment(images, sizes, rgb=lambda i: rgb_images[i])

Adding a method (one new module, nothing else edited):

1. Write a frozen dataclass config (the paper's values as defaults, every threshold named) and a
   class with the `Method` attributes: name, kind ("masks"), summary, needs_tags (segments
   TagCLIP's tags), needs_rgb (wants the decoded RGB image), options (which of `SEGMENT_OPTIONS`
   it takes), settings (e.g. `SETTINGS`), and the methods config(setting, **options),
   build(backbone, vocab, config, quirks=..., tagclip=..., run_tagclip=...) -> a `Segments`
   (`segment(images, sizes, tags, rgb, keep_cams)` -> one `SegOutput` per image), and
   record(config, quirks) -> the dict stored in the run record.
2. Use only the backbone's public entry points (`Backbone.dense_forward`,
   `Backbone.custom_last_block_forward` for a changed last-block attention, with earlier layers'
   q, k and tokens on request, ...). Read quirks from the `quirks.Quirks` given to `build`.
3. Call `register(MyMethod())` at the module's top level, and make the module found: a built-in
   is listed in `registry.BUILTIN_MODULES`; a plug-in package declares the entry point
   `[project.entry-points."tagclip_cli.methods"] my_method = "my_package.my_method"`, or a user
   names the module in `TAGCLIP_METHODS=my_package.my_method`. `tagclip segment --method my_method`
   and the API then accept it. tests/test_methods.py registers a toy method this way.
"""

from tagclip_cli.methods.base import KINDS, SEGMENT_OPTIONS, SETTINGS, Method, Segments, SegOutput
from tagclip_cli.methods.registry import (
    ENTRY_POINT_GROUP,
    PLUGIN_ENV,
    configure,
    get,
    load_methods,
    names,
    register,
    unregister,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "PLUGIN_ENV",
    "SEGMENT_OPTIONS",
    "SETTINGS",
    "Method",
    "SegOutput",
    "Segments",
    "configure",
    "get",
    "load_methods",
    "names",
    "register",
    "unregister",
]
