"""The built-in shapes world: a prompt grammar, questions, a renderer and procedural teachers."""

from .grammar import COLORS, RELATIONS, SHAPES, SIZES, Group, Scene, parse, render_prompt, scene_or_none, scene_skills
from .questions import questions_for
from .render import render
from .sampling import GrammarPrompts, GrammarSlice, sample_scene
from .teachers import CompoundTeacher, MixtureTeacher, ProceduralTeacher, TeacherConfig, default_gallery, gallery_teacher

__all__ = [
    "COLORS", "RELATIONS", "SHAPES", "SIZES", "Group", "Scene", "parse", "render_prompt", "scene_or_none", "scene_skills",
    "questions_for", "render", "GrammarPrompts", "GrammarSlice", "sample_scene",
    "CompoundTeacher", "MixtureTeacher", "ProceduralTeacher", "TeacherConfig", "default_gallery", "gallery_teacher",
]
