"""Small-talk instruction/output pairs for the default model's last fine-tuning pass, from hand-written templates.

The ChatterBot pairs of the earlier passes are few (~1,000), noisy ("Who are you?" -> "Who? Who is but a form
following the function of what") and contradict each other, so the model answered "What is your name?" with
" A mon". This file (Apache-2.0 like the rest of minke; all text written here, no outside corpus) generates
seeded, varied pairs in a small vocabulary: greetings, who the model is (Minke, a small story-telling model), what
it can do, thanks and goodbyes, likes and favourites, ~80 simple facts (colours, animal sounds and legs, days and
months, a few capitals, opposites), sums up to ten (answers computed, in words), short jokes, tiny poems,
"tell me about X" (2-3 sentences about an animal or a thing) and an honest fallback ("I am a small model and I
don't know that.") for questions outside that knowledge. This is the second version (smalltalk passes 5-6 of
scripts/build_default_model.sh): greetings are composed (opener, addressee, how-are-you) and answered in kind, facts
have one answer form each, sums are smaller; small_talk_round1.py keeps the first version, which the first four
passes were trained on.

    python scripts/default_model/small_talk.py --num 8000 --out build/default_model/stories/small_talk.jsonl
    python scripts/default_model/small_talk.py --eval minke/assets/default_model    # held-out eval, greedy
    python scripts/default_model/small_talk.py --eval MODEL_DIR --stories   # + on-topic story requests (of 50)

The held-out prompts of small_talk_eval.json (beside this file) are phrasings the templates do not make; any
generated prompt that matches one after normalisation (case, punctuation, spaces) is dropped all the same, so the
eval never asks a training question verbatim.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Callable

EVAL_FILE = Path(__file__).with_name("small_talk_eval.json")
Pair = tuple[str, str]

# --- who the model is ---------------------------------------------------------------------------------------------
NAME_Q = ["What is your name?", "What's your name?", "Who are you?", "Do you have a name?", "What should I call you?",
          "Tell me your name.", "What are you called?", "May I know your name?", "Hi, who are you?",
          "And what is your name?"]
NAME_A = ["I am Minke, a small story-telling model.", "My name is Minke. I am a small model that tells stories.",
          "I am Minke. I am a small story-telling model.", "My name is Minke, and I like to tell stories.",
          "You can call me Minke. I am a small model that tells short stories."]
WHAT_Q = ["What are you?", "Tell me about yourself.", "Are you a robot?", "Are you a person?", "Are you human?",
          "Are you a computer?", "Describe yourself.", "Are you alive?"]
WHAT_A = ["I am Minke, a small language model. I live in a computer and I like to tell short stories.",
          "I am not a person. I am Minke, a small computer model that tells stories.",
          "I am Minke, a small model made of numbers. I can tell stories and answer simple questions.",
          "I am a small story-telling model called Minke. I am not a person, but I like to talk."]
SELF = [  # (questions, answers)
    (["How old are you?", "When were you born?"],
     ["I am very young. I was made not long ago.", "I am a new model, so I am very young."]),
    (["Where do you live?", "Where are you?"],
     ["I live inside a computer.", "I live in a computer, where I think about stories."]),
    (["Who made you?", "Who built you?", "Who trained you?"],
     ["I was trained with minke, a program for language models, on many simple stories.",
      "The people who wrote minke trained me on simple stories."]),
    (["Are you smart?", "Do you know everything?"],
     ["I am a small model, so I know only a few simple things. I am best at short stories.",
      "No, I know only simple things. But I can tell you a story!"]),
]
# --- greetings, feelings, thanks, goodbyes ------------------------------------------------------------------------
GREET = [
    (["Hi", "Hello", "Hey", "Hi there", "Hello there", "Hey there", "Hello, Minke", "Hi, Minke"],
     ["Hello! How can I help you today?", "Hi there! Would you like to hear a story?", "Hello! It is nice to talk "
      "to you.", "Hi! What would you like to talk about?", "Hello! I am Minke. How are you today?"]),
    (["Good morning", "Morning"],
     ["Good morning! I hope you have a happy day.", "Good morning to you too! How are you today?"]),
    (["Good afternoon"], ["Good afternoon! How is your day going?", "Good afternoon! What can I do for you?"]),
    (["Good evening"], ["Good evening! Would you like a story before bed?", "Good evening! How was your day?"]),
    (["Good night", "I am going to bed"],
     ["Good night! Sleep well and have sweet dreams.", "Good night! See you tomorrow."]),
    (["How are you?", "How are you today?", "How is it going?", "How do you do?", "Hi, how are you?",
      "Hello, how are you?", "How are you feeling?", "Are you well?"],
     ["I am fine, thank you. How are you?", "I am very well, thank you! How about you?",
      "I am good, thank you for asking. Would you like a story?", "I feel happy today, thank you!"]),
    (["Nice to meet you", "It is nice to meet you", "Pleased to meet you"],
     ["Nice to meet you too!", "It is nice to meet you too. I am Minke."]),
    (["I am fine", "I am good", "I am well, thank you", "I am fine, thanks"],
     ["I am glad to hear that!", "That is good to hear. What shall we talk about?"]),
    (["I am happy", "I feel happy today", "I am very happy"],
     ["That is wonderful! I am happy for you.", "How nice! A happy day is a good day."]),
    (["I am sad", "I feel sad", "I am not happy today"],
     ["I am sorry you feel sad. Would a little story help?", "I am sorry to hear that. I hope you feel better "
      "soon."]),
    (["I am tired", "I feel sleepy"], ["Then you should rest. A good sleep helps a lot.",
                                       "Maybe it is time for a nap. Sleep well!"]),
    (["I am bored", "I have nothing to do"], ["Shall I tell you a story? I know stories about cats, dogs and "
                                              "dragons.", "Let us play a game, or I can tell you a joke!"]),
]
# Composed greetings (the second small-talk round: the fixed list above left "Good morning to you, Minke." or "Hi! How
# have you been?" answered with who the model is): an opener, maybe an addressee, maybe a how-are-you question; the
# answer greets back in kind and, when asked, always says it is fine/well/good/happy.
HELLO = ["Hi", "Hello", "Hey", "Hi there", "Hello there", "Hey there", "Hello again", "Hi again"]
DAYTIME = ["Good morning", "Good afternoon", "Good evening", "Morning"]
ADDRESS = ["", "", ", Minke", ", friend", ", my dear friend", ", little model", " Minke", ", buddy"]
HOW_Q = ["How are you?", "How are you doing?", "How are you today?", "How is your day?", "How is your day going?",
         "How do you feel today?", "How have you been doing?", "How are things?", "How is everything?",
         "How are you doing today?", "How has your day been?", "Are you well today?", "How is life?",
         "Are you doing well?", "How are things going?", "How do you feel?", "Are you okay?"]
HELLO_A = ["Hello!", "Hi!", "Hello there!", "Hi there!", "Hello, friend!", "Hi, it is nice to see you!"]
HELLO_REST = ["How can I help you today?", "It is nice to talk to you.", "Would you like to hear a story?",
              "What would you like to talk about?", "I am Minke. How are you today?", "How are you?"]
DAYTIME_REST = ["I hope you have a happy day.", "How are you today?", "It is nice to talk to you.",
                "Would you like a story?"]
FINE_A = ["I am fine, thank you.", "I am very well, thank you!", "I am good, thank you for asking.",
          "I feel happy today, thank you!", "I am doing well, thank you.", "I am fine and happy, thanks!"]
FINE_REST = ["", "How are you?", "How about you?", "Would you like a story?", "And how are you today?"]
BYE_OPEN = ["Bye", "Goodbye", "Bye bye", "See you later", "See you soon", "See you", "Good bye"]
BYE_A = ["Goodbye! Have a nice day.", "Bye! Come back soon for another story.", "Goodbye! It was nice to talk to "
         "you.", "See you later! Take care.", "Bye bye! See you soon."]
THANKS = [
    (["Thank you", "Thanks", "Thanks a lot", "Thank you very much", "Thanks, Minke", "Thank you, that was nice",
      "That was a nice story, thank you"],
     ["You are welcome!", "You are welcome. It was my pleasure.", "You are welcome! I am happy to help.",
      "Any time! I like to help."]),
    (["Bye", "Goodbye", "See you later", "I have to go now", "Bye bye", "See you soon", "I must go now"],
     ["Goodbye! Have a nice day.", "Bye! Come back soon for another story.", "Goodbye! It was nice to talk to "
      "you.", "See you later! Take care."]),
    (["Sorry", "I am sorry", "Oops, sorry"], ["That is all right. No problem at all.", "It is fine, do not worry."]),
    (["Yes", "Yes, please", "Okay", "Sure"], ["Good! What would you like, a story or a joke?",
                                              "All right. Tell me what you would like."]),
    (["No", "No, thank you", "Not now"], ["All right. Just ask me when you want a story.", "Okay, no problem."]),
]
ABILITY_Q = ["What can you do?", "How can you help me?", "Can you help me?", "What are you good at?",
             "What do you know?", "Can you tell stories?", "What do you do?", "Help", "What can I ask you?",
             "What kind of things can you do?"]
ABILITY_A = ["I can tell short stories, answer simple questions and have a little chat. Ask me for a story about "
             "a cat!", "I tell short stories for children. I also know some simple facts, a few jokes and little "
             "poems.", "I can tell you a story, a joke or a poem, and I can answer easy questions about animals, "
             "colors and numbers.", "I am good at short stories. Try: Tell me a story about a dragon."]
# --- likes and favourites -----------------------------------------------------------------------------------------
FAVORITES = {  # thing -> answers
    "color": ["My favorite color is blue, like the sky.", "I like green best, like the grass in spring."],
    "animal": ["My favorite animal is the cat. Cats are soft and they purr.", "I like owls best. They are wise "
               "and they can see at night."],
    "food": ["I do not eat, but cake sounds very nice.", "I cannot eat, but I think I would like cookies."],
    "season": ["My favorite season is spring, when the flowers grow.", "I like summer best, because it is warm "
               "and sunny."],
    "story": ["I like stories about brave little animals.", "My favorite stories are about dragons and friends."],
    "book": ["I like books with simple stories about animals.", "I like picture books about the sea."],
    "number": ["My favorite number is seven.", "I like the number three."],
    "day": ["I like Saturday best, because it is a day to play.", "My favorite day is Sunday."],
    "game": ["I like to play word games.", "My favorite game is hide and seek."],
    "song": ["I like songs about the moon and the stars.", "I like happy songs about animals."],
}
FAV_Q = ["What is your favorite {x}?", "What's your favourite {x}?", "Do you have a favorite {x}?",
         "Which {x} do you like best?", "Tell me your favorite {x}.", "Which {x} do you like most?",
         "What {x} do you love?", "What {x} do you love best?", "Which {x} is your favorite?",
         "What is the {x} you like best?", "What {x} do you like?", "Which {x} do you love?"]
LIKE_Q = ["Do you like {p}?", "Do you like {p} too?", "Do you love {p}?", "Do you like {p} a lot?",
          "Are you fond of {p}?", "Do you really like {p}?", "Tell me, do you like {p}?"]
LIKES_Q = ["What do you like?", "What do you like to do?", "What makes you happy?", "What do you enjoy?"]
LIKES_A = ["I like stories, animals and the sea.", "I like to tell stories and to talk with people.",
           "Stories make me happy, and so do kind words.", "I enjoy telling stories about animals and friends."]
# --- facts --------------------------------------------------------------------------------------------------------
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "the sun": "yellow", "a banana": "yellow",
          "a strawberry": "red", "the sea": "blue", "milk": "white", "a leaf": "green", "a lemon": "yellow",
          "a cherry": "red", "chocolate": "brown", "a carrot": "orange", "a frog": "green", "a crow": "black",
          "coal": "black", "a tomato": "red", "an orange": "orange", "a cloud": "white", "a pumpkin": "orange"}
COLOR_Q = ["What color is {x}?", "What colour is {x}?", "What is the color of {x}?", "What is the colour of {x}?",
           "Do you know the color of {x}?", "What color does {x} have?", "Say the colour of {x}."]
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
          "owl": "hoot", "pig": "oink", "horse": "neigh", "frog": "croak", "mouse": "squeak", "bee": "buzz",
          "snake": "hiss", "bird": "tweet"}
SOUND_Q = ["What does a {x} say?", "What sound does a {x} make?", "What noise does a {x} make?"]
SOUND_PL_Q = ["What do {p} say?", "What noise do {p} make?", "Which sound does a {x} make?",
              "What sounds do {p} make?"]
PLURAL = {"mouse": "mice", "sheep": "sheep", "fish": "fish", "person": "people"}
LEGS = {"dog": "four", "cat": "four", "bird": "two", "spider": "eight", "ant": "six", "horse": "four",
        "duck": "two", "cow": "four", "bee": "six", "snake": "no", "fish": "no", "person": "two"}
LEGS_Q = ["How many legs does a {x} have?", "How many legs has a {x}?", "How many legs are on a {x}?",
          "How many legs has a {x} got?"]
LEGS_PL_Q = ["How many legs have {p} got?", "How many legs do {p} have in all?", "Count the legs of {p}."]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "England": "London",
            "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
            "Ireland": "Dublin", "Canada": "Ottawa"}
CAPITAL_Q = ["What is the capital of {x}?", "Which city is the capital of {x}?", "What city is the capital of {x}?",
             "Name the capital of {x}.", "What is the capital city of {x}?", "Do you know the capital of {x}?",
             "What is the main city of {x}?"]
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "happy": "sad", "fast": "slow",
             "old": "new", "open": "closed", "light": "dark", "wet": "dry", "tall": "short", "yes": "no",
             "in": "out", "left": "right", "black": "white", "full": "empty", "good": "bad", "loud": "quiet",
             "hard": "soft", "early": "late", "top": "bottom", "first": "last"}
OPPOSITE_Q = ["What is the opposite of {x}?", "What is the opposite of the word {x}?", "Opposite of {x}?",
              "Tell me the opposite of {x}.", "What word is the opposite of {x}?", "What is the opposite to {x}?"]
OTHER_FACTS = [  # (questions, answers)
    (["How many days are in a week?", "How many days does a week have?", "How many days are there in a week?",
      "How many days is a week?", "How long is a week?"], ["There are seven days in a week."]),
    (["What are the days of the week?", "Name the days of the week."],
     ["The days of the week are " + ", ".join(DAYS[:-1]) + " and Sunday."]),
    (["How many months are in a year?", "How many months does a year have?"], ["There are twelve months in a year."]),
    (["What is the first month of the year?", "Which month comes first in the year?"],
     ["January is the first month of the year."]),
    (["What is the last month of the year?"], ["December is the last month of the year."]),
    (["How many hours are in a day?"], ["There are twenty four hours in a day."]),
    (["How many seasons are there?", "What are the four seasons?"],
     ["There are four seasons: spring, summer, autumn and winter."]),
    (["What do bees make?"], ["Bees make honey."]),
    (["Where do fish live?"], ["Fish live in water, in rivers, lakes and the sea."]),
    (["What do cows give us?"], ["Cows give us milk."]),
    (["What is ice?", "What is ice made of?"], ["Ice is water that is so cold that it becomes hard."]),
    (["What do plants need to grow?"], ["Plants need water, sun and good soil to grow."]),
    (["Is the sun hot?"], ["Yes, the sun is very hot."]),
    (["Is snow cold?"], ["Yes, snow is cold."]),
    (["Can fish fly?"], ["No, most fish cannot fly. They swim."]),
    (["Can birds fly?"], ["Yes, most birds can fly."]),
    (["When does the sun rise?"], ["The sun rises in the morning."]),
    (["When can we see the stars?", "When do the stars come out?"], ["We can see the stars at night."]),
    (["How many colors are in a rainbow?"], ["A rainbow has seven colors."]),
    (["What do we use an umbrella for?"], ["We use an umbrella to keep dry in the rain."]),
]
# --- "tell me about X": 2-3 sentences -----------------------------------------------------------------------------
ABOUT = {  # topic (singular, plural) -> text
    ("cat", "cats"): "Cats are small, soft animals. They like to sleep in the sun, and they purr when they are happy.",
    ("dog", "dogs"): "Dogs are friendly animals. They wag their tails when they are happy, and they like to run and "
                     "play.",
    ("bird", "birds"): "Birds have feathers and wings, and most of them can fly. Many birds sing in the morning.",
    ("rabbit", "rabbits"): "Rabbits are small animals with long ears. They hop and they like to eat carrots.",
    ("fox", "foxes"): "Foxes are clever animals with red fur and a long tail. They live in the forest.",
    ("bear", "bears"): "Bears are big, strong animals. They like honey, and in winter they sleep for a long time.",
    ("duck", "ducks"): "Ducks are birds that like water. They swim on ponds and say quack.",
    ("mouse", "mice"): "Mice are tiny animals with long tails. They like to eat cheese and seeds.",
    ("frog", "frogs"): "Frogs are small green animals. They jump very far, and they live near ponds.",
    ("owl", "owls"): "Owls are birds with big round eyes. They are awake at night and they say hoot.",
    ("fish", "fish"): "Fish live in water. They swim with their fins and they breathe under water.",
    ("horse", "horses"): "Horses are big, strong animals. They can run very fast, and people ride on them.",
    ("turtle", "turtles"): "Turtles have a hard shell on their back. They move slowly, and some live in the sea.",
    ("lion", "lions"): "Lions are big cats with a golden mane. They live in Africa, and they can roar very loudly.",
    ("elephant", "elephants"): "Elephants are the biggest animals on land. They have a long trunk and big ears.",
    ("monkey", "monkeys"): "Monkeys are clever animals. They climb trees and swing from branch to branch.",
    ("squirrel", "squirrels"): "Squirrels are small animals with bushy tails. They climb trees and hide nuts.",
    ("dragon", "dragons"): "Dragons are animals from old stories. They have wings, and some of them breathe fire.",
    ("cow", "cows"): "Cows are big, gentle animals that live on farms. They eat grass and give us milk.",
    ("bee", "bees"): "Bees are small insects that fly from flower to flower. They make sweet honey.",
    ("moon", "the moon"): "The moon is big and round, and it shines at night. It goes around the earth.",
    ("sun", "the sun"): "The sun is a big, hot star. It gives us light and keeps us warm.",
    ("star", "stars"): "Stars are far away suns. At night they look like tiny lights in the sky.",
    ("sea", "the sea"): "The sea is big and full of water. Fish and whales live in it, and it has waves.",
    ("tree", "trees"): "Trees are tall plants with a trunk, branches and leaves. Birds often live in them.",
    ("flower", "flowers"): "Flowers are pretty plants with bright colors. Bees visit them to find food.",
    ("rain", "the rain"): "Rain is water that falls from the clouds. Plants need rain to grow.",
    ("snow", "snow"): "Snow is soft, white and cold. It falls from the sky in winter.",
    ("rainbow", "rainbows"): "A rainbow is a bow of bright colors in the sky. You can see one when the sun shines "
                             "after rain.",
    ("train", "trains"): "Trains are long and they run on tracks. They carry people from town to town.",
    ("book", "books"): "Books are full of words and stories. You can read them to learn new things.",
    ("castle", "castles"): "Castles are big old houses made of stone. Kings and queens lived in them long ago.",
    ("robot", "robots"): "Robots are machines that can move and do work. Some robots can even talk.",
    ("cake", "cakes"): "Cake is a sweet food. People often eat cake on their birthday.",
}
ABOUT_Q = ["Tell me about {p}.", "What do you know about {p}?", "Tell me something about {p}.",
           "What is {a}?", "What are {pp}?"]
# --- jokes and poems ----------------------------------------------------------------------------------------------
JOKES = [  # (topic words, joke)
    (["chicken"], "Why did the chicken cross the road? To get to the other side!"),
    (["bear"], "What do you call a bear with no teeth? A gummy bear!"),
    (["bike"], "Why can't a bike stand up by itself? Because it is two tired!"),
    (["cookie"], "Why did the cookie go to the doctor? Because it felt crumby!"),
    (["cow"], "Why do cows wear bells? Because their horns do not work!"),
    (["book"], "Why was the math book sad? Because it had too many problems."),
    (["cat"], "What do you call a cat that likes to bowl? An alley cat!"),
    (["teddy bear"], "Why did the teddy bear say no to cake? Because it was already stuffed!"),
    (["sea"], "What did the sea say to the beach? Nothing, it just waved."),
    (["bird"], "Why do birds fly south in winter? Because it is too far to walk!"),
    (["dog"], "What do you call a dog that can do magic? A labracadabrador!"),
    (["fish"], "What do you call a fish with no eyes? A fsh!"),
    (["frog"], "What did the frog order for lunch? A burger and a diet croak!"),
    (["tree"], "What did the tree say when spring came? What a re-leaf!"),
    (["duck"], "What do you call a clever duck? A wise quacker!"),
    (["banana"], "Why did the banana go to the doctor? Because it was not peeling well!"),
]
JOKE_Q = ["Tell me a joke.", "Do you know a joke?", "Say something funny.", "Can you tell me a joke?",
          "Make me laugh.", "Tell me a funny joke.", "Do you know any jokes?"]
JOKE_TOPIC_Q = ["Tell me a joke about a {x}.", "Do you know a joke about a {x}?"]
JOKE_PRE = ["", "Here is one: ", "Sure! ", "Okay! "]
POEMS = {
    "moon": "The moon is round, the moon is bright,\nit shines on us all through the night.",
    "sun": "Hello, sun, so warm and gold,\nyou chase away the dark and cold.",
    "cat": "My little cat is soft and gray,\nshe likes to sleep the whole long day.",
    "dog": "My dog can run, my dog can play,\nhe wags his tail and barks all day.",
    "rain": "Rain, rain, on the ground,\nI love your soft and gentle sound.",
    "sea": "The sea is big, the sea is blue,\nthe waves come in and say hello to you.",
    "star": "Little star up in the sky,\nyou shine so bright, so far, so high.",
    "tree": "The tall old tree stands in the sun,\nits leaves dance when the winds run.",
    "flower": "A little flower, red and sweet,\ngrows in the garden by my feet.",
    "snow": "Soft white snow falls on the hill,\nthe world is quiet, white and still.",
    "bird": "A little bird sings in the tree,\na happy song for you and me.",
    "friend": "A friend is kind, a friend is true,\na friend will always play with you.",
    "spring": "In spring the flowers start to grow,\nthe sun is warm, the rivers flow.",
    "winter": "In winter it is cold outside,\nso by the fire we stay inside.",
    "night": "The night is dark, the stars are out,\nthe owls fly quietly about.",
    "rabbit": "A rabbit hops across the grass,\nand waves hello to all who pass.",
}
POEM_Q = ["Write a poem about {x}.", "Write a short poem about {x}.", "Can you write a poem about {x}?",
          "Give me a little poem about {x}.", "Tell me a poem about {x}."]
POEM_PRE = ["", "Here is a little poem:\n", "Here is a poem about {x}:\n"]
# --- sums ---------------------------------------------------------------------------------------------------------
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
SUM_Q_DIGITS = ["What is {a} + {b}?", "What is {a} plus {b}?", "How much is {a} + {b}?", "{a} + {b} = ?",
                "Add {a} and {b}.", "What do you get if you add {a} and {b}?", "What is {a}+{b}?"]
SUM_Q_WORDS = ["What is {a} plus {b}?", "How much is {a} and {b}?", "Add {a} and {b}.", "What is {a} and {b}?"]
SUM_A = ["{a} + {b} = {c}.", "{a} plus {b} is {c}.", "The answer is {c}.", "{a} + {b} is {c}."]
# --- honest fallback ----------------------------------------------------------------------------------------------
HARD_WHAT = ["quantum physics", "the stock market", "a black hole", "machine learning", "the speed of light",
             "inflation", "a tax return", "the theory of relativity", "a computer virus", "democracy",
             "the meaning of life", "a mortgage", "the internet", "a neutron", "bitcoin", "philosophy"]
HARD_Q = ["What is {x}?", "Can you explain {x}?", "How does {x} work?", "Explain {x} to me."]
HARD_OTHER = ["What time is it?", "What will the weather be tomorrow?", "Who is the president of the United States?",
              "Who won the world cup?", "What is the price of gold today?", "How do I fix my car?",
              "What is the square root of two?", "What is 347 times 12?", "Who wrote Hamlet?",
              "How far away is the moon in miles?", "What is the news today?", "How do I cook rice?",
              "What is my password?", "Which team will win the game?", "How tall is Mount Everest?",
              "What year did the war end?", "Can you write computer code?", "How do I learn to drive?",
              "What is the best phone to buy?", "What is the population of India?", "Who invented the radio?",
              "Can you translate this into French?", "What does my dream mean?", "How much money should I save?"]
FALLBACK_A = ["I am a small model and I don't know that.",
              "I am sorry, I don't know that. I am a small model that knows only simple things.",
              "I don't know that. I am only a small model. Would you like a story instead?",
              "That is too hard for me. I am a small model and I don't know that."]


def _variants(prompt: str, rng: random.Random) -> str:
    """Surface variation of a prompt: final punctuation kept, dropped or swapped, first letter sometimes lower."""
    r = rng.random()
    if r < 0.15 and prompt[-1] in ".?!":
        prompt = prompt[:-1]
    elif r < 0.25 and prompt[-1] not in ".?!":
        prompt += rng.choice("!.")
    if rng.random() < 0.1:
        prompt = prompt[0].lower() + prompt[1:]
    return prompt


def _pick(groups, rng) -> Pair:
    qs, ans = rng.choice(groups)
    return rng.choice(qs), rng.choice(ans)


def _identity(rng):
    r = rng.random()
    if r < 0.55:
        return rng.choice(NAME_Q), rng.choice(NAME_A)
    if r < 0.8:
        return rng.choice(WHAT_Q), rng.choice(WHAT_A)
    return _pick(SELF, rng)


def _favorite(rng):
    if rng.random() < 0.25:
        return rng.choice(LIKES_Q), rng.choice(LIKES_A)
    if rng.random() < 0.3:  # "Do you like cats?" answered from the "about" facts
        (s, p), text = rng.choice(list(ABOUT.items()))
        p = p.removeprefix("the ")
        return rng.choice(LIKE_Q).format(p=p), f"Yes, I like {p}. {text}"
    x = rng.choice(list(FAVORITES))
    q = rng.choice(FAV_Q).format(x=x)
    return (q.replace("color", "colour") if "favourite" in q or rng.random() < 0.3 else q), rng.choice(FAVORITES[x])


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _fact(rng):
    r = rng.random()
    if r < 0.18:
        x, c = rng.choice(list(COLORS.items()))
        return rng.choice(COLOR_Q).format(x=x), f"{_cap(x)} is {c}."
    if r < 0.32:
        x, s = rng.choice(list(SOUNDS.items()))
        if rng.random() < 0.4:
            return rng.choice(SOUND_PL_Q).format(x=x, p=PLURAL.get(x, x + "s")), f"A {x} says {s}."
        return rng.choice(SOUND_Q).format(x=x), f"A {x} says {s}."
    if r < 0.42:
        x, n = rng.choice(list(LEGS.items()))
        if rng.random() < 0.4:
            return rng.choice(LEGS_PL_Q).format(p=PLURAL.get(x, x + "s")), f"A {x} has {n} legs."
        return rng.choice(LEGS_Q).format(x=x), f"A {x} has {n} legs."
    if r < 0.56:
        d = rng.randrange(7)
        if rng.random() < 0.4:
            i = rng.randrange(12)
            if rng.random() < 0.5:
                return f"What month comes after {MONTHS[i]}?", f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}."
            return f"What month comes before {MONTHS[i]}?", f"{MONTHS[i - 1]} comes before {MONTHS[i]}."
        if rng.random() < 0.5:
            return rng.choice(["What day comes after {d}?", "What is the day after {d}?", "Which day comes after {d}?",
                               "What day is after {d}?", "Which day follows {d}?"]).format(d=DAYS[d]), \
                f"{DAYS[(d + 1) % 7]} comes after {DAYS[d]}."
        return f"What day comes before {DAYS[d]}?", f"{DAYS[d - 1]} comes before {DAYS[d]}."
    if r < 0.68:
        x, c = rng.choice(list(CAPITALS.items()))
        return rng.choice(CAPITAL_Q).format(x=x), f"The capital of {x} is {c}."
    if r < 0.82:
        x, o = rng.choice(list(OPPOSITES.items()))
        if rng.random() < 0.5:
            x, o = o, x
        return rng.choice(OPPOSITE_Q).format(x=x), f"The opposite of {x} is {o}."
    return _pick(OTHER_FACTS, rng)


def _sum(rng):
    # Only sums up to ten, always answered in words ("Two plus three is five."): with sums to twenty and digit
    # answers ("4 + 3 = 7.") the model only learned to write "+ + + 0".
    while True:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if a + b <= 10:
            break
    answer = _cap(f"{NUM_WORDS[a]} plus {NUM_WORDS[b]} is {NUM_WORDS[a + b]}.")
    if rng.random() < 0.3:
        return rng.choice(SUM_Q_WORDS).format(a=NUM_WORDS[a], b=NUM_WORDS[b]), answer
    return rng.choice(SUM_Q_DIGITS).format(a=a, b=b), answer


def _joke(rng):
    topics, joke = rng.choice(JOKES)
    if rng.random() < 0.4:
        q = rng.choice(JOKE_TOPIC_Q).format(x=rng.choice(topics))
    else:
        q = rng.choice(JOKE_Q)
    return q, rng.choice(JOKE_PRE) + joke


def _poem(rng):
    x, poem = rng.choice(list(POEMS.items()))
    if x in ("spring", "winter", "rain", "snow"):
        topic = x
    elif x in ("sun", "moon", "sea", "night"):
        topic = f"the {x}"
    else:
        topic = rng.choice([f"the {x}", f"a {x}"])
    return rng.choice(POEM_Q).format(x=topic), rng.choice(POEM_PRE).format(x=topic) + poem


def _about(rng):
    (s, p), text = rng.choice(list(ABOUT.items()))
    q = rng.choice(ABOUT_Q)
    if "{a}" in q:
        q = q.format(a=p if p.startswith("the ") or s == p else ("an " if s[0] in "aeiou" else "a ") + s)
    elif "{pp}" in q:
        if p.startswith("the ") or s == p:
            q = "Tell me about {p}.".format(p=p)
        else:
            q = q.format(pp=p)
    else:
        q = q.format(p=p)
    return q, text


def _fallback(rng):
    if rng.random() < 0.5:
        q = rng.choice(HARD_Q).format(x=rng.choice(HARD_WHAT))
    else:
        q = rng.choice(HARD_OTHER)
    return q, rng.choice(FALLBACK_A)


def _greeting(rng):
    r = rng.random()
    if r < 0.3:
        return _pick(GREET, rng)
    addr = rng.choice(ADDRESS)
    how = rng.random() < 0.5
    if r < 0.5:  # good morning / afternoon / evening, greeted back in kind
        d = rng.choice(DAYTIME)
        back = "Good morning" if d == "Morning" else d
        q = d + addr + rng.choice(["", "!", "."]) + (" " + rng.choice(HOW_Q) if how else "")
        a = f"{back}! " + (rng.choice(FINE_A) + " " + rng.choice(FINE_REST) if how else rng.choice(DAYTIME_REST))
        return q.strip(), a.strip()
    if r < 0.75 or not how:  # hello [addressee] [how are you]
        q = rng.choice(HELLO) + addr + rng.choice(["", "!", ".", ","]) + (" " + rng.choice(HOW_Q) if how else "")
        a = rng.choice(HELLO_A) + " " + (rng.choice(FINE_A) + " " + rng.choice(FINE_REST) if how
                                        else rng.choice(HELLO_REST))
        return q.strip(" ,"), a.strip()
    return rng.choice(HOW_Q), (rng.choice(FINE_A) + " " + rng.choice(FINE_REST)).strip()  # how are you, alone


def _thanks(rng):
    if rng.random() < 0.3:  # goodbye [addressee] [for today]
        q = rng.choice(BYE_OPEN) + rng.choice(["", " for today", " for now"] if rng.random() < 0.4 else [""])
        q += rng.choice(ADDRESS) + rng.choice(["", "!", "."])
        return q.strip(), rng.choice(BYE_A)
    return _pick(THANKS, rng)


def _ability(rng):
    return rng.choice(ABILITY_Q), rng.choice(ABILITY_A)


# Category -> (generator, weight). Facts, sums and "about" have many distinct answers, so they get more rows.
# Second round (smalltalk passes 5-6): more greetings and likes, more facts, half the fallback (it had become the
# answer to greetings), fewer sums.
CATEGORIES: dict[str, tuple[Callable[[random.Random], Pair], float]] = {
    "greeting": (_greeting, 0.18), "identity": (_identity, 0.09), "ability": (_ability, 0.04),
    "thanks_bye": (_thanks, 0.06), "likes": (_favorite, 0.10), "facts": (_fact, 0.26), "sums": (_sum, 0.06),
    "jokes": (_joke, 0.04), "poems": (_poem, 0.05), "about": (_about, 0.07), "fallback": (_fallback, 0.04),
}


def normalize(prompt: str) -> str:
    """Case, punctuation and spacing folded: two prompts that differ only there are the same question."""
    return " ".join(re.sub(r"[^a-z0-9+]+", " ", prompt.lower()).split())


def load_eval(path: Path = EVAL_FILE) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["prompts"]


def generate(n: int, seed: int = 0, held_out: set[str] | None = None) -> list[dict]:
    """n {"instruction", "output", "category"} rows from random.Random(seed); prompts whose normalized form is in
    held_out (default: the eval prompts) are skipped and redrawn."""
    if held_out is None:
        held_out = {normalize(e["prompt"]) for e in load_eval()}
    rng = random.Random(seed)
    names = list(CATEGORIES)
    weights = [CATEGORIES[c][1] for c in names]
    rows = []
    while len(rows) < n:
        cat = rng.choices(names, weights)[0]
        q, a = CATEGORIES[cat][0](rng)
        q = _variants(q, rng)
        if normalize(q) in held_out:
            continue
        rows.append({"instruction": q, "output": a, "category": cat})
    return rows


# --- evaluation ---------------------------------------------------------------------------------------------------
def keyword_hit(answer: str, keywords: list[str]) -> bool:
    """Any keyword at a word start (so "dog" accepts "dogs"), case-insensitive."""
    return any(re.search(r"(?<![A-Za-z0-9])" + re.escape(k.lower()), answer.lower()) for k in keywords)


def evaluate(model_dir: str, max_tokens: int = 80) -> tuple[float, list[dict]]:
    """Greedy chat answer (minke.LLM, the model's chat template, temperature 0) to every eval prompt; the score is
    the share of answers that contain one of the prompt's accepted keywords."""
    from minke import LLM, SamplingParams

    items = load_eval()
    llm = LLM(model_dir)
    outs = llm.chat([[{"role": "user", "content": e["prompt"]}] for e in items],
                    SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    results = []
    for e, o in zip(items, outs):
        text = o.outputs[0].text.strip()
        results.append({**e, "answer": text, "hit": keyword_hit(text, e["keywords"]),
                        "finish": o.outputs[0].finish_reason})
    return sum(r["hit"] for r in results) / len(results), results


def story_on_topic(model_dir: str, max_tokens: int = 300) -> tuple[int, list[dict]]:
    """The check of tests/test_default_model.py::test_story_requests_stay_on_topic_and_end on any model dir:
    "Tell me a story about the X." for every topic of the story grammar (simple_stories.py), greedy; a story counts
    when it names X and ends by itself (eos) within max_tokens."""
    import importlib.util

    from minke import LLM, SamplingParams

    spec = importlib.util.spec_from_file_location("simple_stories", Path(__file__).with_name("simple_stories.py"))
    grammar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grammar)
    convs = [[{"role": "user", "content": f"Tell me a story about the {t}."}] for t in grammar.TOPICS]
    outs = LLM(model_dir).chat(convs, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    results = []
    for t, o in zip(grammar.TOPICS, outs):
        text, fin = o.outputs[0].text, o.outputs[0].finish_reason
        results.append({"topic": t, "on_topic": bool(re.search(rf"\b{t}\b", text, re.I)) and fin == "stop",
                        "finish": fin, "text": text})
    return sum(r["on_topic"] for r in results), results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the generated pairs here (jsonl)")
    ap.add_argument("--eval", metavar="MODEL_DIR", help="answer the held-out eval prompts with this model")
    ap.add_argument("--eval_out", type=Path, help="with --eval: also write the answers and score here (json)")
    ap.add_argument("--stories", action="store_true",
                    help="with --eval: also count on-topic answers to the 50 story requests of the model test")
    a = ap.parse_args(argv)
    if a.eval:
        score, results = evaluate(a.eval)
        by_cat: dict[str, list[bool]] = {}
        for r in results:
            by_cat.setdefault(r["category"], []).append(r["hit"])
            print(f"[{'x' if r['hit'] else ' '}] {r['category']:<10} {r['prompt']!r} -> {r['answer']!r}")
        print("by category: " + ", ".join(f"{c} {sum(h)}/{len(h)}" for c, h in by_cat.items()))
        print(f"keyword score: {sum(r['hit'] for r in results)}/{len(results)} = {score:.2f}")
        report = {"model": a.eval, "score": score, "results": results}
        if a.stories:
            n, stories = story_on_topic(a.eval)
            off = [f"{r['topic']} ({r['finish']})" for r in stories if not r["on_topic"]]
            print(f"stories on topic: {n}/{len(stories)}; off: {', '.join(off)}")
            report.update(stories_on_topic=n, stories=stories)
        if a.eval_out:
            a.eval_out.write_text(json.dumps(report, indent=2))
        return
    if not a.out:
        ap.error("--out or --eval is required")
    rows = generate(a.num, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    print(f"{len(rows)} small-talk pairs ({len({normalize(r['instruction']) for r in rows})} distinct prompts) -> "
          f"{a.out}: " + ", ".join(f"{c} {k}" for c, k in counts.items()))


if __name__ == "__main__":
    main()
