"""The shape of what a pickle would build, measured from its opcodes before anything is unpickled.

The unpickler builds shared structures cheaply (a memo reference is one pointer), but hashing, comparing or
printing them walks every path: 64 levels of a tuple referencing its child twice is 373 bytes of pickle and
2^64 steps of hashing when it is a dict key, and a million nested tuples crash the interpreter's C recursion.
So the opcodes are run here on sizes instead of objects: every value the pickle would build is measured as
the tree it unfolds to (shared parts counted each time) and its nesting, and the pickle is refused before
loading when a value would be too large or too deep, or when a dict key or set element (what gets hashed)
would be more than a small tree.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass, field

#: nodes of the tree any value unfolds to (a 70B state dict's pickle: ~15 nodes per tensor)
MAX_NODES = 1 << 24
#: objects the pickle creates (a state dict: ~17 per tensor; each costs its unpickler ~60 bytes or more)
MAX_OBJECTS = 1 << 22
#: nesting of any value (a state dict's: 4 to 6)
MAX_DEPTH = 64
#: nodes of a value that is hashed: a dict key or a set element (a state dict's keys are strings: 1)
MAX_KEY_NODES = 256


class PickleShapeError(ValueError):
    """What the pickle would build that streamsoup refuses, in words."""


@dataclass(slots=True)
class Node:
    """One value on the simulated stack or in the memo; a container grows in place as the pickle fills it."""

    size: int = 1
    depth: int = 0
    name: str | None = None  # a string's value or a global's "module name", for STACK_GLOBAL and REDUCE
    widest: int = 0  # the size of its largest item (what set(list) would hash)
    small: tuple[Node, ...] = field(default=(), repr=False)  # a short tuple's items (the arguments of a call)
    collides: bool = False  # holds an int of 61 bits or more: such ints can share one hash by the thousand

    def add(self, children: list[Node]) -> None:
        self.size = min(self.size + sum(c.size for c in children), MAX_NODES + 1)
        self.depth = max(self.depth, 1 + max((c.depth for c in children), default=0))
        self.widest = max(self.widest, max((c.size for c in children), default=0))
        self.collides = self.collides or any(c.collides for c in children)


#: calls that hash their arguments' items: set(list), frozenset(list)
HASHING = {"builtins set", "builtins frozenset"}
#: made empty and filled by SETITEMS in a state dict; made from items, it would hash keys of lists filled later
ORDERED_DICT = "collections OrderedDict"
#: Python hashes an int modulo this prime: larger ints are where colliding dict keys are made
HASH_MODULUS = 2**61 - 1

#: opcodes that push one leaf (a number, a string, bytes, None, a bool)
LEAVES = {
    "INT",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG",
    "LONG1",
    "LONG4",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "BYTEARRAY8",
    "UNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "FLOAT",
    "BINFLOAT",
    "NONE",
    "NEWTRUE",
    "NEWFALSE",
    "NEXT_BUFFER",
    "PERSID",
    "EXT1",
    "EXT2",
    "EXT4",
}
IGNORED = {"PROTO", "FRAME", "STOP", "READONLY_BUFFER"}


def check_pickle_shape(data: bytes) -> None:
    """PickleShapeError when a value the pickle builds is too large, too deep, or hashed while more than a small
    tree; ValueError (or IndexError) for a pickle whose opcodes are malformed."""
    stack: list[Node] = []
    marks: list[int] = []  # where each open MARK is in the stack
    memo: dict[int, Node] = {}

    def since_mark() -> list[Node]:
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    created = 0

    def push(node: Node, fresh: bool = True) -> None:
        nonlocal created
        created += fresh
        if created > MAX_OBJECTS:
            raise PickleShapeError(f"more than {MAX_OBJECTS} objects")
        if node.size > MAX_NODES:
            raise PickleShapeError(f"a value of more than {MAX_NODES} parts (shared parts counted each time)")
        if node.depth > MAX_DEPTH:
            raise PickleShapeError(f"a value nested deeper than {MAX_DEPTH} levels")
        stack.append(node)

    def hashed(nodes: list[Node]) -> None:
        for n in nodes:
            if n.size > MAX_KEY_NODES:
                raise PickleShapeError(f"a dict key or set element of more than {MAX_KEY_NODES} parts")
            if n.collides:
                raise PickleShapeError(
                    "a dict key or set element holding an integer of 61 bits or more (such keys "
                    "can be made to share one hash)"
                )

    def call(func: Node | str | None, args: list[Node]) -> Node:
        name = func if isinstance(func, str) or func is None else func.name
        if name == ORDERED_DICT and args:
            raise PickleShapeError("an OrderedDict made from items (a state dict's is made empty, then filled)")
        if name in HASHING:  # every item of the argument is hashed
            hashed([Node(size=a.widest, collides=a.collides) if a.depth else a for a in args])
        return container(args)

    def arguments(args: Node) -> list[Node]:
        """A call's arguments: the items of a short tuple (an empty one has none), else the tuple as one."""
        return list(args.small) if args.small or args.size == 1 else [args]

    def container(children: list[Node]) -> Node:
        node = Node(small=tuple(children) if len(children) <= 3 else ())
        node.add(children)
        return node

    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if arg > len(memo):  # a pickler numbers them in order; the unpickler sizes its memo by the index
                raise PickleShapeError(f"a memo index ({arg}) out of sequence")
            memo[arg] = stack[-1]
        elif name in IGNORED:
            continue
        elif name in LEAVES:
            big = type(arg) is int and abs(arg) >= HASH_MODULUS
            push(Node(name=arg if isinstance(arg, str) else None, collides=big))
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            push(memo[arg], fresh=False)
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("POP", "POP_MARK"):
            since_mark() if name == "POP_MARK" else stack.pop()
        elif name == "DUP":
            push(stack[-1], fresh=False)
        elif name == "GLOBAL":
            push(Node(name=str(arg)))
        elif name == "STACK_GLOBAL":
            attr, module = stack.pop(), stack.pop()
            push(Node(name=f"{module.name} {attr.name}"))
        elif name in ("EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
            push(Node(depth=1))
        elif name in ("TUPLE", "LIST"):
            push(container(since_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            children = stack[-count:]
            del stack[-count:]
            push(container(children))
        elif name in ("DICT", "FROZENSET"):
            items = since_mark()
            hashed(items[0::2] if name == "DICT" else items)
            push(container(items))
        elif name == "APPEND":
            item = stack.pop()
            stack[-1].add([item])
            push(stack.pop(), fresh=False)
        elif name in ("APPENDS", "ADDITEMS"):
            items = since_mark()
            if name == "ADDITEMS":
                hashed(items)
            stack[-1].add(items)
            push(stack.pop(), fresh=False)
        elif name in ("SETITEM", "SETITEMS"):
            items = [stack.pop() for _ in range(2)][::-1] if name == "SETITEM" else since_mark()
            hashed(items[0::2])
            stack[-1].add(items)
            push(stack.pop(), fresh=False)
        elif name in ("REDUCE", "NEWOBJ"):
            args, func = stack.pop(), stack.pop()
            push(call(func, arguments(args)))
        elif name == "NEWOBJ_EX":
            kwargs, args, cls = stack.pop(), stack.pop(), stack.pop()
            push(call(cls, [*arguments(args), kwargs]))
        elif name == "BUILD":
            state = stack.pop()
            stack[-1].add([state])
            push(stack.pop(), fresh=False)
        elif name == "BINPERSID":
            stack.pop()
            push(Node())
        elif name == "INST":
            push(call(str(arg), since_mark()))
        elif name == "OBJ":
            cls, *args = since_mark()
            push(call(cls, args))
        else:
            raise ValueError(f"opcode {name}")
