"""New rows of several tables in one INSERT statement: one round trip to PostgreSQL.

The paid create writes four rows (the payment and its first event, the prediction and its
first event). Through ``Model.objects.create`` that is four statements, four round trips and
four passes through the ORM's save machinery; here a row costs its fields' preparation only,
and the rows of one call travel together as data-modifying CTEs
(``WITH a AS (INSERT ...), b AS (INSERT ...) INSERT ...``). PostgreSQL checks the foreign keys
between them at the end of the statement (Django declares them deferrable, initially deferred,
in any case), and a uniqueness violation is the same IntegrityError a ``save()`` would raise.
"""

from __future__ import annotations

from functools import cache

from django.db import connections, models
from django.db.models.sql import InsertQuery


def insert(*rows: models.Model, using: str = "default") -> None:
    """Insert ``rows`` (new instances, in an order their foreign keys allow) in one statement.

    As ``save()`` would for a new row: field defaults, ``pre_save`` (``auto_now_add``) and the
    database preparation of each value. No ``save()`` override runs and no signal is sent: the
    caller is the row's one writer and does what its ``save()`` would. A row whose key the
    database assigns (an auto field) is inserted without learning it (no event row is read
    back where it is written).
    """
    connection = connections[using]
    statements, params = [], []
    for row in rows:
        sql, fields = _statement(type(row), row.pk is None, using)
        statements.append(sql)
        params += [f.get_db_prep_save(f.pre_save(row, True), connection) for f in fields]
    *ctes, last = statements
    sql = "".join(f"{'WITH' if i == 0 else ','} r{i} AS ({s}) " for i, s in enumerate(ctes)) + last
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
    for row in rows:
        row._state.adding, row._state.db = False, using


@cache
def _statement(model: type[models.Model], auto_key: bool, using: str) -> tuple[str, tuple[models.Field, ...]]:
    """The model's INSERT of one row, as Django's compiler writes it, and its fields in order."""
    meta = model._meta
    fields = tuple(
        f
        for f in meta.local_concrete_fields
        if not f.generated and not (auto_key and f is meta.auto_field)
    )
    query = InsertQuery(model)
    query.insert_values(fields, [model()])
    ((sql, placeholders),) = query.get_compiler(using).as_sql()
    if len(placeholders) != len(fields) or sql.count("%s") != len(fields):
        raise TypeError(f"{model.__name__}: a field's value is not a plain parameter")
    return sql, fields
