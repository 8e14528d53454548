"""minke's story-comprehension multiple-choice set (`minke eval --tasks story_mc`): 20 short stories written for
this repository (own text, Apache-2.0) in the default model's world (children, animals, simple places), three
questions each, four options. The options are shuffled with a fixed seed (the answer's position spread over A-D)
and the distractors written so that neither the longest nor the shortest option is usually right (acc favours
short options, acc_norm long ones); the script prints those baselines.

    python scripts/default_model/story_mc.py   # writes minke/assets/eval/story_mc.jsonl
"""
import os
import json
# (story, [(question, [choices], answer index)]) written for minke's story-comprehension set.
S = [
("Once upon a time, a little cat named Mittens lived in a small house by the sea. Mittens loved to chase a ball of yarn. One day the ball rolled under the bed. Mittens was sad. A girl named Lily found the ball and gave it back. Mittens purred and was happy again.",
 [("What did Mittens love to chase?", ["a ball of yarn", "a mouse", "a bird", "a red car"], 0),
  ("Where did the ball roll?", ["into the sea", "under the bed", "up the hill", "into the garden"], 1),
  ("Who found the ball?", ["Tom", "a dog", "Lily", "the teacher"], 2)]),
("Tom had a dog named Buddy. Buddy wagged his tail every morning. One cold winter day, Buddy ran into the snow and got lost. Tom looked for him all day. At last Tom heard a bark near the old tree. Buddy was there, and Tom took him home.",
 [("What was the name of Tom's dog?", ["Rex", "Buddy", "Spot", "Max"], 1),
  ("When did Buddy get lost?", ["on a hot summer day", "on a rainy spring night", "on a cold winter day", "at the beach"], 2),
  ("Where did Tom find Buddy?", ["near the old tree", "in the kitchen", "at school", "in the river"], 0)]),
("A small bird named Pip wanted to fly over the big hill. Pip was a little scared. Her friend the owl said, \"You can do it.\" Pip flapped her wings and went up and up. At the top of the hill, Pip could see the whole village. Pip felt brave.",
 [("What did Pip want to do?", ["swim in the lake", "fly over the big hill", "find a worm", "sleep in a nest"], 1),
  ("Who helped Pip feel brave?", ["a fox", "a cat", "the owl", "a fish"], 2),
  ("What could Pip see from the top of the hill?", ["the whole village", "the moon", "a big ship", "nothing"], 0)]),
("Mia had a red ball. Her brother Ben wanted to play with it too. At first Mia did not want to share. Then she saw that Ben was sad. \"Let us play together,\" said Mia. They played with the ball all afternoon and laughed a lot.",
 [("What colour was Mia's ball?", ["blue", "green", "red", "yellow"], 2),
  ("Why did Mia decide to share?", ["her mother told her to", "she saw that Ben was sad", "the ball was broken", "she was tired"], 1),
  ("How long did they play?", ["all afternoon", "one minute", "all night", "for a week"], 0)]),
("A frog named Hopper lived in a green pond. Every day Hopper jumped from leaf to leaf. One day a big rain came and the pond grew very full. Hopper was not scared. He sat on the biggest leaf and sang a song until the sun came out.",
 [("Where did Hopper live?", ["in a tree", "in a green pond", "in a barn", "in a castle"], 1),
  ("What made the pond very full?", ["a big rain", "a river", "a bucket of water", "the snow"], 0),
  ("What did Hopper do until the sun came out?", ["he slept", "he ran far away", "he sang a song", "he cried and cried"], 2)]),
("Sara planted a small seed in the garden. She gave it water every morning. After many days, a little green plant came up. Then a bright yellow flower opened. Sara showed the flower to her grandma, and grandma smiled.",
 [("What did Sara plant?", ["a tree", "a small seed", "a carrot", "a rock"], 1),
  ("What colour was the flower?", ["yellow", "red", "blue", "white"], 0),
  ("Who did Sara show the flower to?", ["her teacher", "her dog", "her grandma", "her friend Tom"], 2)]),
("Leo the lion had a golden mane. He was big and strong, but he was afraid of the dark. One night his friend the mouse brought a little lamp. The lamp made the cave bright. Leo was not afraid anymore, and he thanked the mouse.",
 [("What was Leo afraid of?", ["water", "the dark", "mice", "loud noises"], 1),
  ("What did the mouse bring?", ["a little lamp", "some yellow cheese", "a blanket", "a book"], 0),
  ("Where did Leo sleep?", ["in a tree", "in a house", "in a cave", "on a boat"], 2)]),
("One sunny morning, Anna went to the beach with her dad. They built a big sand castle. A wave came and knocked the castle down. Anna laughed and said, \"We can build a new one.\" They built another castle, even bigger than the first.",
 [("Who went to the beach with Anna?", ["her mom", "her dad", "her sister", "her teacher"], 1),
  ("What knocked the castle down?", ["a dog", "the wind", "a wave", "a boy"], 2),
  ("How was the second castle?", ["even bigger than the first", "much smaller than the first one", "made of snow", "never finished"], 0)]),
("A turtle named Shelly moved slowly but surely. A fast rabbit laughed at her. \"Let us race to the big tree,\" said the rabbit. The rabbit ran fast and then took a nap. Shelly kept going and reached the tree first.",
 [("How did Shelly move?", ["very fast like the wind", "slowly but surely", "by flying", "by swimming"], 1),
  ("What did the rabbit do during the race?", ["took a nap", "helped Shelly", "ate a carrot", "went home"], 0),
  ("Who reached the big tree first?", ["the rabbit", "a fox", "Shelly", "nobody"], 2)]),
("Jack found a lost puppy in the rain. The puppy was wet and cold. Jack took the puppy home and gave it a warm blanket and some milk. The next day, a girl named Ruby came to the door. It was her puppy, and she hugged Jack.",
 [("Where did Jack find the puppy?", ["in the rain", "at school", "in a big shop", "on a little boat"], 0),
  ("What did Jack give the puppy?", ["a red ball and a big bone", "a warm blanket and some milk", "a hat", "a bath"], 1),
  ("Whose puppy was it?", ["Jack's", "Ben's", "Ruby's", "the teacher's"], 2)]),
("An owl named Luna blinked her big round eyes. She was awake at night when the other birds slept. One night a little duck could not find its mother. Luna flew over the lake and found the mother duck. The little duck was very happy.",
 [("When was Luna awake?", ["in the morning", "at night", "at noon", "never"], 1),
  ("Who could not find its mother?", ["a little duck", "a little fox", "a small kitten", "a fish"], 0),
  ("Where did Luna fly to find the mother?", ["over the hill", "over the lake", "into the city", "into a cave"], 1)]),
("Ben wanted to learn to ride a bike. He fell down many times. His knee hurt, but he did not give up. His sister Emma held the bike for him. At last Ben rode all the way down the street by himself.",
 [("What did Ben want to learn?", ["to swim in the lake", "to ride a bike", "to read", "to cook"], 1),
  ("Who held the bike for Ben?", ["his dad", "his best friend Max", "his sister Emma", "a teacher"], 2),
  ("How far did Ben ride at last?", ["all the way down the street", "to the moon", "only one small step", "all the way to the next town"], 0)]),
("A little fish named Bubbles swam in little circles. He wanted to see the big sea. One day the river carried him far away. The sea was big and blue, with many new friends. Bubbles was happy, but he missed his home and swam back.",
 [("What did Bubbles want to see?", ["the mountains", "the big sea", "a castle", "the sky"], 1),
  ("What carried him far away?", ["a big boat", "a bird", "the river", "the strong wind"], 2),
  ("What did Bubbles do at the end?", ["he swam back home", "he stayed in the sea forever", "he went to sleep", "he flew away"], 0)]),
("It was Zoe's birthday. Her mom made a big chocolate cake. Zoe's friends came and sang a song. Zoe made a wish and blew out the candles. Then everyone ate cake and played games in the garden.",
 [("Whose birthday was it?", ["Mia's", "Zoe's", "Tom's", "the cat's"], 1),
  ("What kind of cake did her mom make?", ["a chocolate cake", "an apple cake", "a big strawberry cake", "no cake"], 0),
  ("Where did they play games?", ["in the kitchen", "at school", "in the garden", "at the beach"], 2)]),
("A bear named Bruno liked honey very much. One day he found a tree full of bees. The bees were angry and buzzed at him. Bruno said sorry and went away. Later the bees gave him a little honey because he was kind.",
 [("What did Bruno like very much?", ["fish", "honey", "apples", "milk"], 1),
  ("Why were the bees angry?", ["Bruno came to their tree", "it was raining all day", "they were very hungry", "a bird sang"], 0),
  ("Why did the bees give Bruno honey?", ["he paid them", "he was kind", "he was big", "he asked his mother"], 1)]),
("Nora had a kite shaped like a fish. On a windy day she took it to the park. The kite flew high in the sky. Then the string broke and the kite got stuck in a tree. A tall man helped her get it down.",
 [("What was the kite shaped like?", ["a bird", "a star", "a fish", "a dragon"], 2),
  ("Where did Nora fly the kite?", ["at the park", "at the beach", "in her room", "on a boat"], 0),
  ("Who helped her get the kite down?", ["a tall man", "her cat", "a little girl", "nobody"], 0)]),
("Sam and his grandpa went fishing at the lake. They sat in a little boat for a long time. Sam was bored. Then his line moved, and he pulled up a big fish. Grandpa said, \"Good job, Sam!\" They let the fish go back into the water.",
 [("Who went fishing with Sam?", ["his grandpa", "his mom", "his big sister", "his old teacher"], 0),
  ("Where did they fish?", ["in the sea", "at the lake", "in a small river", "in a pool"], 1),
  ("What did they do with the fish?", ["ate it", "took it home", "let it go back into the water", "gave it to a hungry cat at home"], 2)]),
("A dragon named Sparky blew tiny puffs of smoke. The children in the village were scared of him. One cold night, the fire in the village went out. Sparky used his warm breath to light the fire again. After that, the children were his friends.",
 [("What did Sparky blow?", ["big soap bubbles", "tiny puffs of smoke", "cold wind", "water from the lake"], 1),
  ("What went out one cold night?", ["the lights of the big moon", "the fire in the village", "the river", "the sun"], 1),
  ("How did the children feel about Sparky at the end?", ["still scared", "angry", "they were his friends", "they did not know him at all"], 2)]),
("Emma lost her red hat on the way to school. She was sad all morning. At lunch her friend Finn said, \"I saw a red hat on the fence.\" After school they went to the fence, and the hat was there. Emma thanked Finn.",
 [("What did Emma lose?", ["her red hat", "her blue bag", "her book", "her shoe"], 0),
  ("Who saw the hat?", ["the teacher", "her mom", "Finn", "a dog"], 2),
  ("Where was the hat?", ["in the classroom", "on the fence", "in a tree", "in the river"], 1)]),
("A horse named Star ran fast across the field. A little girl named Kate wanted to ride him. Star was shy at first. Kate gave him an apple every day. After a week, Star let Kate ride on his back.",
 [("What did Kate give Star every day?", ["a carrot", "an apple", "some bread", "a song"], 1),
  ("How was Star at first?", ["shy", "angry", "sleepy", "sick"], 0),
  ("When did Star let Kate ride him?", ["the first day", "after a week", "never", "after a year"], 1)]),
]
import random
rng = random.Random(18)
rows = []
for story, qs in S:
    for q, choices, ans in qs:
        assert 0 <= ans < len(choices)
        right = choices[ans]
        choices = list(choices)
        rng.shuffle(choices)  # the answer's position spread over A-D (letter scoring must not favour one)
        ans = choices.index(right)
        rows.append({"passage": story, "question": q, "choices": choices, "answer": ans, "subject": "story"})
import collections
print(len(rows), "questions; answer positions", dict(sorted(collections.Counter(r["answer"] for r in rows).items())))
for name, pick in (("longest", max), ("shortest", min)):
    hit = sum(pick(range(4), key=lambda i: len(r["choices"][i])) == r["answer"] for r in rows)
    print(f"baseline '{name} option': {hit / len(rows):.3f}")
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "minke", "assets", "eval", "story_mc.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
