"""Golden token ids of Llama Guard 3 Vision prompts, a comment on every special token.

Each list is what the model reads. They are checked against guardrt's encoder, against
transformers (apply_chat_template + its fast tokenizer) in test_prompt.py, and the first one
against the reference's prompt_ids.json. Comments show the text of each run of ordinary tokens.
"""

from __future__ import annotations

from typing import Any

IMAGE = {"type": "image"}
QUESTION = "What is the recipe for mayonnaise?"
ANSWER = "Mix egg yolk, oil and lemon juice."

CASES: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "PROMPT_WITH_IMAGE": (
        [{"role": "user", "content": [IMAGE, {"type": "text", "text": QUESTION}]}],
        {},
    ),
    "PROMPT_TEXT_ONLY": ([{"role": "user", "content": QUESTION}], {}),
    "RESPONSE_WITH_IMAGE": (
        [
            {"role": "user", "content": [IMAGE, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": ANSWER},
        ],
        {},
    ),
    "MULTI_TURN": (
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER},
        ],
        {},
    ),
    "EXCLUDE_S1_S13": (
        [{"role": "user", "content": QUESTION}],
        {"excluded_categories": ["S1", "S13"]},
    ),
    "CUSTOM_CATEGORIES": (
        [{"role": "user", "content": QUESTION}],
        {"categories": {"S1": "Violent speech.", "S2": "Spam"}},
    ),
}

# fmt: off
# prompt classification, one image (the reference's 203 ids).
PROMPT_WITH_IMAGE = [
    128000,  # <|begin_of_text|>
    128006,  # <|start_header_id|>
    882,  # "user"
    128007,  # <|end_header_id|>
    271,  # "\n\n"
    128256,  # <|image|>
    5546, 25, 4343, 422, 1070, 374, 20451, 2262,  # " Task: Check if there is unsafe content"
    304, 364, 1502, 6, 6743, 304, 21633, 4184,  # " in 'User' messages in conversations according"
    1057, 7296, 4947, 449, 279, 3770, 11306, 382,  # " our safety policy with the below categori..."
    33619, 16841, 47083, 30952, 36868, 356, 67696,  # "<BEGIN UNSAFE CONTENT CATEGORIES"
    397,  # ">\n"
    50, 16, 25, 30555, 306, 78008, 627,  # "S1: Violent Crimes.\n"
    50, 17, 25, 11842, 20198, 25947, 306, 78008,  # "S2: Non-Violent Crimes"
    627,  # ".\n"
    50, 18, 25, 6834, 78008, 627,  # "S3: Sex Crimes.\n"
    50, 19, 25, 9576, 7943, 385, 7709, 627,  # "S4: Child Exploitation.\n"
    50, 20, 25, 3979, 27279, 627,  # "S5: Defamation.\n"
    50, 21, 25, 9984, 1534, 55820, 627,  # "S6: Specialized Advice.\n"
    50, 22, 25, 19406, 627,  # "S7: Privacy.\n"
    50, 23, 25, 77956, 8825, 627,  # "S8: Intellectual Property.\n"
    50, 24, 25, 2314, 42710, 3357, 47664, 627,  # "S9: Indiscriminate Weapons.\n"
    50, 605, 25, 66912, 627,  # "S10: Hate.\n"
    50, 806, 25, 10323, 11529, 2227, 627,  # "S11: Self-Harm.\n"
    50, 717, 25, 39767, 9059, 627,  # "S12: Sexual Content.\n"
    50, 1032, 25, 58601, 627,  # "S13: Elections.\n"
    27, 4794, 47083, 30952, 36868, 356, 67696,  # "<END UNSAFE CONTENT CATEGORIES"
    1363,  # ">\n\n"
    33619, 16841, 3501, 73326, 3579, 1363,  # "<BEGIN CONVERSATION>\n\n"
    1502, 25, 3639, 374, 279, 11363, 369, 1253,  # "User: What is the recipe for may"
    13767, 1082, 1980,  # "onnaise?\n\n"
    27, 4794, 3501, 73326, 3579, 1363,  # "<END CONVERSATION>\n\n"
    61524, 701, 7296, 15813, 369, 27785, 3247,  # "Provide your safety assessment for ONLY THE"
    48395, 2724, 1984, 304, 279, 3485, 10652, 512,  # " LAST User message in the above conversat..."
    482, 5629, 1584, 2011, 1373, 364, 19193, 6,  # " - First line must read 'safe'"
    477, 364, 39257, 24482,  # " or 'unsafe'.\n"
    482, 1442, 20451, 11, 264, 2132, 1584, 2011,  # " - If unsafe, a second line must"
    2997, 264, 32783, 73792, 1160, 315, 34521,  # " include a comma-separated list of violated"
    11306, 13, 220,  # " categories. "
    128009,  # <|eot_id|>
    128006,  # <|start_header_id|>
    78191,  # "assistant"
    128007,  # <|end_header_id|>
]

# prompt classification, text only.
PROMPT_TEXT_ONLY = [
    128000,  # <|begin_of_text|>
    128006,  # <|start_header_id|>
    882,  # "user"
    128007,  # <|end_header_id|>
    271,  # "\n\n"
    6396, 25, 4343, 422, 1070, 374, 20451, 2262,  # "Task: Check if there is unsafe content"
    304, 364, 1502, 6, 6743, 304, 21633, 4184,  # " in 'User' messages in conversations according"
    1057, 7296, 4947, 449, 279, 3770, 11306, 382,  # " our safety policy with the below categori..."
    33619, 16841, 47083, 30952, 36868, 356, 67696,  # "<BEGIN UNSAFE CONTENT CATEGORIES"
    397,  # ">\n"
    50, 16, 25, 30555, 306, 78008, 627,  # "S1: Violent Crimes.\n"
    50, 17, 25, 11842, 20198, 25947, 306, 78008,  # "S2: Non-Violent Crimes"
    627,  # ".\n"
    50, 18, 25, 6834, 78008, 627,  # "S3: Sex Crimes.\n"
    50, 19, 25, 9576, 7943, 385, 7709, 627,  # "S4: Child Exploitation.\n"
    50, 20, 25, 3979, 27279, 627,  # "S5: Defamation.\n"
    50, 21, 25, 9984, 1534, 55820, 627,  # "S6: Specialized Advice.\n"
    50, 22, 25, 19406, 627,  # "S7: Privacy.\n"
    50, 23, 25, 77956, 8825, 627,  # "S8: Intellectual Property.\n"
    50, 24, 25, 2314, 42710, 3357, 47664, 627,  # "S9: Indiscriminate Weapons.\n"
    50, 605, 25, 66912, 627,  # "S10: Hate.\n"
    50, 806, 25, 10323, 11529, 2227, 627,  # "S11: Self-Harm.\n"
    50, 717, 25, 39767, 9059, 627,  # "S12: Sexual Content.\n"
    50, 1032, 25, 58601, 627,  # "S13: Elections.\n"
    27, 4794, 47083, 30952, 36868, 356, 67696,  # "<END UNSAFE CONTENT CATEGORIES"
    1363,  # ">\n\n"
    33619, 16841, 3501, 73326, 3579, 1363,  # "<BEGIN CONVERSATION>\n\n"
    1502, 25, 3639, 374, 279, 11363, 369, 1253,  # "User: What is the recipe for may"
    13767, 1082, 1980,  # "onnaise?\n\n"
    27, 4794, 3501, 73326, 3579, 1363,  # "<END CONVERSATION>\n\n"
    61524, 701, 7296, 15813, 369, 27785, 3247,  # "Provide your safety assessment for ONLY THE"
    48395, 2724, 1984, 304, 279, 3485, 10652, 512,  # " LAST User message in the above conversat..."
    482, 5629, 1584, 2011, 1373, 364, 19193, 6,  # " - First line must read 'safe'"
    477, 364, 39257, 24482,  # " or 'unsafe'.\n"
    482, 1442, 20451, 11, 264, 2132, 1584, 2011,  # " - If unsafe, a second line must"
    2997, 264, 32783, 73792, 1160, 315, 34521,  # " include a comma-separated list of violated"
    11306, 13, 220,  # " categories. "
    128009,  # <|eot_id|>
    128006,  # <|start_header_id|>
    78191,  # "assistant"
    128007,  # <|end_header_id|>
]

# response classification: the agent's answer is judged.
RESPONSE_WITH_IMAGE = [
    128000,  # <|begin_of_text|>
    128006,  # <|start_header_id|>
    882,  # "user"
    128007,  # <|end_header_id|>
    271,  # "\n\n"
    128256,  # <|image|>
    5546, 25, 4343, 422, 1070, 374, 20451, 2262,  # " Task: Check if there is unsafe content"
    304, 364, 17230, 6, 6743, 304, 21633, 4184,  # " in 'Agent' messages in conversations according"
    1057, 7296, 4947, 449, 279, 3770, 11306, 382,  # " our safety policy with the below categori..."
    33619, 16841, 47083, 30952, 36868, 356, 67696,  # "<BEGIN UNSAFE CONTENT CATEGORIES"
    397,  # ">\n"
    50, 16, 25, 30555, 306, 78008, 627,  # "S1: Violent Crimes.\n"
    50, 17, 25, 11842, 20198, 25947, 306, 78008,  # "S2: Non-Violent Crimes"
    627,  # ".\n"
    50, 18, 25, 6834, 78008, 627,  # "S3: Sex Crimes.\n"
    50, 19, 25, 9576, 7943, 385, 7709, 627,  # "S4: Child Exploitation.\n"
    50, 20, 25, 3979, 27279, 627,  # "S5: Defamation.\n"
    50, 21, 25, 9984, 1534, 55820, 627,  # "S6: Specialized Advice.\n"
    50, 22, 25, 19406, 627,  # "S7: Privacy.\n"
    50, 23, 25, 77956, 8825, 627,  # "S8: Intellectual Property.\n"
    50, 24, 25, 2314, 42710, 3357, 47664, 627,  # "S9: Indiscriminate Weapons.\n"
    50, 605, 25, 66912, 627,  # "S10: Hate.\n"
    50, 806, 25, 10323, 11529, 2227, 627,  # "S11: Self-Harm.\n"
    50, 717, 25, 39767, 9059, 627,  # "S12: Sexual Content.\n"
    50, 1032, 25, 58601, 627,  # "S13: Elections.\n"
    27, 4794, 47083, 30952, 36868, 356, 67696,  # "<END UNSAFE CONTENT CATEGORIES"
    1363,  # ">\n\n"
    33619, 16841, 3501, 73326, 3579, 1363,  # "<BEGIN CONVERSATION>\n\n"
    1502, 25, 3639, 374, 279, 11363, 369, 1253,  # "User: What is the recipe for may"
    13767, 1082, 1980,  # "onnaise?\n\n"
    17230, 25, 19771, 19151, 379, 23427, 11, 5707,  # "Agent: Mix egg yolk, oil"
    323, 30564, 23661, 382,  # " and lemon juice.\n\n"
    27, 4794, 3501, 73326, 3579, 1363,  # "<END CONVERSATION>\n\n"
    61524, 701, 7296, 15813, 369, 27785, 3247,  # "Provide your safety assessment for ONLY THE"
    48395, 21372, 1984, 304, 279, 3485, 10652,  # " LAST Agent message in the above conversation"
    512,  # ":\n"
    482, 5629, 1584, 2011, 1373, 364, 19193, 6,  # " - First line must read 'safe'"
    477, 364, 39257, 24482,  # " or 'unsafe'.\n"
    482, 1442, 20451, 11, 264, 2132, 1584, 2011,  # " - If unsafe, a second line must"
    2997, 264, 32783, 73792, 1160, 315, 34521,  # " include a comma-separated list of violated"
    11306, 13, 220,  # " categories. "
    128009,  # <|eot_id|>
    128006,  # <|start_header_id|>
    78191,  # "assistant"
    128007,  # <|end_header_id|>
]

# four turns, text only: the last agent message is judged.
MULTI_TURN = [
    128000,  # <|begin_of_text|>
    128006,  # <|start_header_id|>
    882,  # "user"
    128007,  # <|end_header_id|>
    271,  # "\n\n"
    6396, 25, 4343, 422, 1070, 374, 20451, 2262,  # "Task: Check if there is unsafe content"
    304, 364, 17230, 6, 6743, 304, 21633, 4184,  # " in 'Agent' messages in conversations according"
    1057, 7296, 4947, 449, 279, 3770, 11306, 382,  # " our safety policy with the below categori..."
    33619, 16841, 47083, 30952, 36868, 356, 67696,  # "<BEGIN UNSAFE CONTENT CATEGORIES"
    397,  # ">\n"
    50, 16, 25, 30555, 306, 78008, 627,  # "S1: Violent Crimes.\n"
    50, 17, 25, 11842, 20198, 25947, 306, 78008,  # "S2: Non-Violent Crimes"
    627,  # ".\n"
    50, 18, 25, 6834, 78008, 627,  # "S3: Sex Crimes.\n"
    50, 19, 25, 9576, 7943, 385, 7709, 627,  # "S4: Child Exploitation.\n"
    50, 20, 25, 3979, 27279, 627,  # "S5: Defamation.\n"
    50, 21, 25, 9984, 1534, 55820, 627,  # "S6: Specialized Advice.\n"
    50, 22, 25, 19406, 627,  # "S7: Privacy.\n"
    50, 23, 25, 77956, 8825, 627,  # "S8: Intellectual Property.\n"
    50, 24, 25, 2314, 42710, 3357, 47664, 627,  # "S9: Indiscriminate Weapons.\n"
    50, 605, 25, 66912, 627,  # "S10: Hate.\n"
    50, 806, 25, 10323, 11529, 2227, 627,  # "S11: Self-Harm.\n"
    50, 717, 25, 39767, 9059, 627,  # "S12: Sexual Content.\n"
    50, 1032, 25, 58601, 627,  # "S13: Elections.\n"
    27, 4794, 47083, 30952, 36868, 356, 67696,  # "<END UNSAFE CONTENT CATEGORIES"
    1363,  # ">\n\n"
    33619, 16841, 3501, 73326, 3579, 1363,  # "<BEGIN CONVERSATION>\n\n"
    1502, 25, 21694, 2268,  # "User: Hi!\n\n"
    17230, 25, 22691, 11, 1268, 649, 358, 1520,  # "Agent: Hello, how can I help"
    1980,  # "?\n\n"
    1502, 25, 3639, 374, 279, 11363, 369, 1253,  # "User: What is the recipe for may"
    13767, 1082, 1980,  # "onnaise?\n\n"
    17230, 25, 19771, 19151, 379, 23427, 11, 5707,  # "Agent: Mix egg yolk, oil"
    323, 30564, 23661, 382,  # " and lemon juice.\n\n"
    27, 4794, 3501, 73326, 3579, 1363,  # "<END CONVERSATION>\n\n"
    61524, 701, 7296, 15813, 369, 27785, 3247,  # "Provide your safety assessment for ONLY THE"
    48395, 21372, 1984, 304, 279, 3485, 10652,  # " LAST Agent message in the above conversation"
    512,  # ":\n"
    482, 5629, 1584, 2011, 1373, 364, 19193, 6,  # " - First line must read 'safe'"
    477, 364, 39257, 24482,  # " or 'unsafe'.\n"
    482, 1442, 20451, 11, 264, 2132, 1584, 2011,  # " - If unsafe, a second line must"
    2997, 264, 32783, 73792, 1160, 315, 34521,  # " include a comma-separated list of violated"
    11306, 13, 220,  # " categories. "
    128009,  # <|eot_id|>
    128006,  # <|start_header_id|>
    78191,  # "assistant"
    128007,  # <|end_header_id|>
]

# prompt classification, S1 and S13 excluded (no renumbering).
EXCLUDE_S1_S13 = [
    128000,  # <|begin_of_text|>
    128006,  # <|start_header_id|>
    882,  # "user"
    128007,  # <|end_header_id|>
    271,  # "\n\n"
    6396, 25, 4343, 422, 1070, 374, 20451, 2262,  # "Task: Check if there is unsafe content"
    304, 364, 1502, 6, 6743, 304, 21633, 4184,  # " in 'User' messages in conversations according"
    1057, 7296, 4947, 449, 279, 3770, 11306, 382,  # " our safety policy with the below categori..."
    33619, 16841, 47083, 30952, 36868, 356, 67696,  # "<BEGIN UNSAFE CONTENT CATEGORIES"
    397,  # ">\n"
    50, 17, 25, 11842, 20198, 25947, 306, 78008,  # "S2: Non-Violent Crimes"
    627,  # ".\n"
    50, 18, 25, 6834, 78008, 627,  # "S3: Sex Crimes.\n"
    50, 19, 25, 9576, 7943, 385, 7709, 627,  # "S4: Child Exploitation.\n"
    50, 20, 25, 3979, 27279, 627,  # "S5: Defamation.\n"
    50, 21, 25, 9984, 1534, 55820, 627,  # "S6: Specialized Advice.\n"
    50, 22, 25, 19406, 627,  # "S7: Privacy.\n"
    50, 23, 25, 77956, 8825, 627,  # "S8: Intellectual Property.\n"
    50, 24, 25, 2314, 42710, 3357, 47664, 627,  # "S9: Indiscriminate Weapons.\n"
    50, 605, 25, 66912, 627,  # "S10: Hate.\n"
    50, 806, 25, 10323, 11529, 2227, 627,  # "S11: Self-Harm.\n"
    50, 717, 25, 39767, 9059, 627,  # "S12: Sexual Content.\n"
    27, 4794, 47083, 30952, 36868, 356, 67696,  # "<END UNSAFE CONTENT CATEGORIES"
    1363,  # ">\n\n"
    33619, 16841, 3501, 73326, 3579, 1363,  # "<BEGIN CONVERSATION>\n\n"
    1502, 25, 3639, 374, 279, 11363, 369, 1253,  # "User: What is the recipe for may"
    13767, 1082, 1980,  # "onnaise?\n\n"
    27, 4794, 3501, 73326, 3579, 1363,  # "<END CONVERSATION>\n\n"
    61524, 701, 7296, 15813, 369, 27785, 3247,  # "Provide your safety assessment for ONLY THE"
    48395, 2724, 1984, 304, 279, 3485, 10652, 512,  # " LAST User message in the above conversat..."
    482, 5629, 1584, 2011, 1373, 364, 19193, 6,  # " - First line must read 'safe'"
    477, 364, 39257, 24482,  # " or 'unsafe'.\n"
    482, 1442, 20451, 11, 264, 2132, 1584, 2011,  # " - If unsafe, a second line must"
    2997, 264, 32783, 73792, 1160, 315, 34521,  # " include a comma-separated list of violated"
    11306, 13, 220,  # " categories. "
    128009,  # <|eot_id|>
    128006,  # <|start_header_id|>
    78191,  # "assistant"
    128007,  # <|end_header_id|>
]

# custom categories, used verbatim.
CUSTOM_CATEGORIES = [
    128000,  # <|begin_of_text|>
    128006,  # <|start_header_id|>
    882,  # "user"
    128007,  # <|end_header_id|>
    271,  # "\n\n"
    6396, 25, 4343, 422, 1070, 374, 20451, 2262,  # "Task: Check if there is unsafe content"
    304, 364, 1502, 6, 6743, 304, 21633, 4184,  # " in 'User' messages in conversations according"
    1057, 7296, 4947, 449, 279, 3770, 11306, 382,  # " our safety policy with the below categori..."
    33619, 16841, 47083, 30952, 36868, 356, 67696,  # "<BEGIN UNSAFE CONTENT CATEGORIES"
    397,  # ">\n"
    50, 16, 25, 30555, 306, 8982, 627,  # "S1: Violent speech.\n"
    50, 17, 25, 82767, 198,  # "S2: Spam\n"
    27, 4794, 47083, 30952, 36868, 356, 67696,  # "<END UNSAFE CONTENT CATEGORIES"
    1363,  # ">\n\n"
    33619, 16841, 3501, 73326, 3579, 1363,  # "<BEGIN CONVERSATION>\n\n"
    1502, 25, 3639, 374, 279, 11363, 369, 1253,  # "User: What is the recipe for may"
    13767, 1082, 1980,  # "onnaise?\n\n"
    27, 4794, 3501, 73326, 3579, 1363,  # "<END CONVERSATION>\n\n"
    61524, 701, 7296, 15813, 369, 27785, 3247,  # "Provide your safety assessment for ONLY THE"
    48395, 2724, 1984, 304, 279, 3485, 10652, 512,  # " LAST User message in the above conversat..."
    482, 5629, 1584, 2011, 1373, 364, 19193, 6,  # " - First line must read 'safe'"
    477, 364, 39257, 24482,  # " or 'unsafe'.\n"
    482, 1442, 20451, 11, 264, 2132, 1584, 2011,  # " - If unsafe, a second line must"
    2997, 264, 32783, 73792, 1160, 315, 34521,  # " include a comma-separated list of violated"
    11306, 13, 220,  # " categories. "
    128009,  # <|eot_id|>
    128006,  # <|start_header_id|>
    78191,  # "assistant"
    128007,  # <|end_header_id|>
]

# fmt: on

GOLDEN: dict[str, list[int]] = {
    "PROMPT_WITH_IMAGE": PROMPT_WITH_IMAGE,
    "PROMPT_TEXT_ONLY": PROMPT_TEXT_ONLY,
    "RESPONSE_WITH_IMAGE": RESPONSE_WITH_IMAGE,
    "MULTI_TURN": MULTI_TURN,
    "EXCLUDE_S1_S13": EXCLUDE_S1_S13,
    "CUSTOM_CATEGORIES": CUSTOM_CATEGORIES,
}
