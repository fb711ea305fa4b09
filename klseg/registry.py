"""The names klseg knows, in one place: model architectures and encoders.

Standard library only, so the command line can offer them as choices without
importing Keras. ``klseg.models`` builds its registry from these names (a
test checks that every name has a builder and every builder a name).
"""

__all__ = ["BACKBONES", "MODELS"]

#: Architectures ``klseg.models.build`` accepts.
MODELS = ("unet", "deeplabv3_plus")

#: Encoders of both architectures: klseg's own ``"plain"`` blocks, or a
#: ``keras.applications`` network.
BACKBONES = ("plain", "resnet50", "mobilenetv2")
