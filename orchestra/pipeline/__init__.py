"""The pipeline a run goes through, one stage per module, in the order data flows:

- ``planning``: the task becomes a validated plan (a DAG of subtasks), with repairs and fallbacks;
- ``staffing``: each node's skills, matched onto profiles, choose its experts and aggregator;
- ``aggregation``: each node's expert answers become its output, and the sinks' the answer;
- ``scheduler``: drives one run's DAG through these stages on the shared executor and builds its result.
"""
