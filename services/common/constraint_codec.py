"""k2.v1.Constraint <-> k2model.constraint_spec.ConstraintSpec.

An absent or empty Constraint is None (unconstrained). The spec's own checks come back as
InvalidArgument naming the field as `constraint.<field>`.
"""

from __future__ import annotations

from k2model.constraint_spec import ConstraintSpec, ToolSchema
from services.common.errors import InvalidArgument
from services.pb.k2.v1 import common_pb2


def constraint_from_proto(msg: common_pb2.Constraint) -> ConstraintSpec | None:
    try:
        spec = ConstraintSpec(
            banned_ids=tuple(msg.banned_ids),
            tools=tuple(ToolSchema(t.name, t.parameters_json, t.strict) for t in msg.tools),
            auto_tools=msg.auto_tools,
            single_call=msg.single_call,
            first_call_index=msg.first_call_index,
            answer_schema=(msg.answer_schema_json if msg.HasField("answer_schema_json") else None),
            answer_after_think=msg.answer_after_think,
        )
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    return None if spec.is_empty else spec


def constraint_to_proto(spec: ConstraintSpec | None) -> common_pb2.Constraint | None:
    if spec is None or spec.is_empty:
        return None
    return common_pb2.Constraint(
        banned_ids=spec.banned_ids,
        tools=[
            common_pb2.ToolSchema(name=t.name, parameters_json=t.parameters_json, strict=t.strict)
            for t in spec.tools
        ],
        auto_tools=spec.auto_tools,
        single_call=spec.single_call,
        first_call_index=spec.first_call_index,
        answer_schema_json=spec.answer_schema,
        answer_after_think=spec.answer_after_think,
    )
